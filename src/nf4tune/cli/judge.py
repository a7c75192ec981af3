"""`nf4tune judge ANSWERS.jsonl ANSWERS2.jsonl ...`: pairwise judging with Elo ratings."""

from __future__ import annotations

import argparse
import json

from .checks import count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "judge", help="judge answer files pairwise with a chat model; win rates and Elo ratings",
        description="Judge two or more answer files (as `nf4tune generate` writes them, same prompts) pairwise, in "
                    "both orders, with an OpenAI-compatible chat model; print win/tie/loss, win rates and Elo ratings "
                    "(K=32, from 1000) averaged over random match orders.")
    p.add_argument("answers", nargs="+", help="one JSONL file of answers per model")
    p.add_argument("--judge-base-url", required=True, help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True)
    p.add_argument("--judge-api-key", help="default $OPENAI_API_KEY")
    p.add_argument("--concurrency", type=count(1), default=8, help="judge requests in flight at once")
    p.add_argument("--orders", type=count(1), default=10000, help="random match orders the Elo ratings are averaged over")
    p.add_argument("--reference", help="a model name: also report each model's score as a %% of this one's")
    p.add_argument("--cache", help="a JSONL file of judge replies: a rerun asks only what it lacks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random match orders")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.judge import judge

    result = judge(args.answers, args.judge_base_url, args.judge_model, args.judge_api_key, args.concurrency,
                   args.orders, args.reference, args.cache, args.seed)
    print(json.dumps(result.as_json()) if args.json else result.table())
    return 0
