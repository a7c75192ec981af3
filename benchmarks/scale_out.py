"""Scale-out: tokens/s and memory per rank of `nf4tune train` on 1 and 2 processes (torchrun, gloo on CPU).

    python benchmarks/scale_out.py [--steps 12] [--threads 1] [--hidden 512] [--layers 4]

A random bf16 Llama (hidden 512, 4 layers, intermediate 1408, the character tokenizer) in NF4 with
double quantization, LoRA r=16 on all linear layers, float32 compute, per-device batch 4 of the
parity rows. One process with accumulation 2 and two processes with accumulation 1 train the same
global batch of 8 (weak scaling by ranks: each rank does half the work per step); 1 thread per rank
(OMP_NUM_THREADS). tokens/s is the global figure rank 0 logs, averaged over the steps after the first
two; memory is the largest peak resident set of any rank (`peak_memory_gib`, ru_maxrss), and
`param_bytes_per_rank` the parameters and buffers a rank holds (summary.json). Scaling efficiency is
tokens/s(N) / (N x tokens/s(1)) where the one process runs the same global batch, so a perfect
2-rank run takes half the time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(root: Path, model: Path, steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model), "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(ROOT / "recipes" / "data" / "parity_train.jsonl"), "source_max_len": 32,
                 "target_max_len": 8},
        "training": {"output_dir": str(root / "out"), "max_steps": steps, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 2, "logging_steps": 1, "save_steps": 10_000, "seed": 0,
                     "optim": "paged_adamw_32bit"},
    }


def run(root: Path, recipe: Path, nproc: int, strategy: str, threads: int) -> dict:
    out = root / f"n{nproc}-{strategy}"
    overrides = [f"training.output_dir={out}"]
    if nproc > 1:
        overrides += ["training.gradient_accumulation_steps=1", f"training.parallel={strategy}"]
    command = [sys.executable, "-m", "nf4tune", "train", str(recipe), *overrides, "--no-progress"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][2:]
    summary = json.loads((out / "summary.json").read_text())
    return {"nproc": nproc, "strategy": strategy if nproc > 1 else "single",
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows),
            "memory_gib_per_rank": max(r["peak_memory_gib"] for r in rows),
            "param_bytes_per_rank": summary["param_bytes_per_rank"], "final_loss": summary["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    import yaml

    from nf4tune.checkpoint.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_checkpoint(root / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_shard_size="50MB")
        (root / "recipe.yaml").write_text(yaml.safe_dump(_recipe(root, model, args.steps)))
        results = [run(root, root / "recipe.yaml", 1, "single", args.threads)]
        for strategy in ("ddp", "fsdp"):
            results.append(run(root, root / "recipe.yaml", 2, strategy, args.threads))
    one = results[0]["tokens_per_s"]
    print(f"{'ranks':>5} {'strategy':>8} {'tokens/s':>10} {'efficiency':>10} {'RSS/rank':>10} {'params/rank':>12} {'loss':>8}")
    for r in results:
        efficiency = r["tokens_per_s"] / (r["nproc"] * one)
        print(f"{r['nproc']:>5} {r['strategy']:>8} {r['tokens_per_s']:>10.0f} {efficiency:>10.0%} "
              f"{r['memory_gib_per_rank']:>8.2f} G {r['param_bytes_per_rank'] / 2**20:>9.2f} MiB {r['final_loss']:>8.4f}")


if __name__ == "__main__":
    main()
