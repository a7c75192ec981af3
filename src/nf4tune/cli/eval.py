"""`nf4tune eval MODEL --task perplexity|multiple_choice --data FILE_OR_HUB_ID [--adapter A --adapter B ...]`: score
a 4-bit (or 16-bit) model, or several adapters on it side by side."""

from __future__ import annotations

import argparse
import json

from ..evaluate.registry import TASKS
from ..registry import BASE_QUANT_TYPES
from .checks import count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity or MMLU-style multiple-choice accuracy of a 4-bit model",
        description="Evaluate MODEL (4-bit, with an optional adapter): perplexity of a text in strided windows, or "
                    "multiple-choice accuracy with lm-evaluation-harness's MMLU prompt. With several --adapter "
                    "(and --with-base), one table with a column per adapter.")
    p.add_argument("model")
    p.add_argument("--adapter", action="append",
                   help="a LoRA adapter folder (nf4tune's or PEFT's); give it again to compare several adapters "
                        "side by side, a column each")
    p.add_argument("--with-base", action="store_true", help="with --adapter: a column for the base model alone too")
    p.add_argument("--quant-type", choices=BASE_QUANT_TYPES, default="nf4",
                   help="how the base is loaded: a 4-bit type (default nf4), or none (16-bit, for adapters of a "
                        "16-bit LoRA run)")
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
    from ..evaluate.registry import compare_adapters, run_task

    options = dict(split=args.split, dev=args.dev, shots=args.shots, method=args.method, limit=args.limit,
                   batch_size=args.batch_size, column=args.column, max_length=args.max_length, stride=args.stride,
                   device=args.device, quant_type=args.quant_type)
    adapters = ([None] if args.with_base else []) + (args.adapter or [])
    if len(adapters) > 1:
        result = compare_adapters(args.task, args.model, args.data, adapters, **options)
    else:
        result = run_task(args.task, args.model, args.data, adapter=adapters[0] if adapters else None, **options)
    print(json.dumps(result.as_json()) if args.json else result.table())
    return 0
