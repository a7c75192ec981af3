"""`nf4tune eval MODEL --task perplexity|multiple_choice --data FILE_OR_HUB_ID`: score a 4-bit model."""

from __future__ import annotations

import argparse
import json

from ..evaluate.registry import TASKS
from .checks import count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity or MMLU-style multiple-choice accuracy of a 4-bit model",
        description="Evaluate MODEL (4-bit, with an optional adapter): perplexity of a text in strided windows, or "
                    "multiple-choice accuracy with lm-evaluation-harness's MMLU prompt.")
    p.add_argument("model")
    p.add_argument("--adapter", help="a LoRA adapter folder (nf4tune's or PEFT's)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet (.txt for perplexity) file or a Hub dataset id")
    p.add_argument("--split", default="test", help="the Hub split to score (default test)")
    p.add_argument("--dev", help="solved examples: a file, or a Hub split (default: the Hub dataset's `dev` split)")
    p.add_argument("--shots", type=count(0), help="solved examples per question (default 5 where there are dev examples, else 0)")
    p.add_argument("--method", default="letter", choices=("letter", "loglikelihood"),
                   help="letter: argmax of the next-token logits over ' A'..' D' (qlora.py); loglikelihood: lm-eval's")
    p.add_argument("--limit", type=count(1), help="score at most N questions (rows of text)")
    p.add_argument("--batch-size", type=count(1), default=8,
                   help="prompts per forward pass (default 8); on nf4tune's CPU prefill path, a pass holds as many "
                        "tokens as this many of the longest prompts, few-shot examples shared by a subject counted once")
    p.add_argument("--column", default="text", help="perplexity: the text column of a data file")
    p.add_argument("--max-length", type=count(2), help="perplexity: window length (default the model's context)")
    p.add_argument("--stride", type=count(1), help="perplexity: window stride (default half the window)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default CUDA where available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.registry import run_task

    result = run_task(args.task, args.model, args.data, adapter=args.adapter, split=args.split, dev=args.dev,
                      shots=args.shots, method=args.method, limit=args.limit, batch_size=args.batch_size,
                      column=args.column, max_length=args.max_length, stride=args.stride, device=args.device)
    print(json.dumps(result.as_json()) if args.json else result.table())
    return 0
