"""`nf4tune estimate MODEL`: will this fine-tune fit on my GPU?"""

from __future__ import annotations

import argparse
import json

from ..registry import OPTIMIZERS
from .checks import count, resolve_builtin


def add_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="estimate the GPU memory of a QLoRA fine-tune from config.json",
        description="Estimate the GPU memory a QLoRA fine-tune of MODEL needs with nf4tune, reading only its "
        "config.json (a local folder, a config.json file, or a Hub id where the network allows).",
    )
    p.add_argument("model")
    p.add_argument("--seq-len", type=count(1), default=2048)
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--r", type=count(1), default=64, help="LoRA rank")
    p.add_argument("--target", default="all-linear", help="all-linear, or module names: q_proj,v_proj")
    p.add_argument("--optim", default="paged_adamw_32bit", choices=list(OPTIMIZERS))
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--gpus", type=count(1), default=1, help="GPUs sharing the model (FSDP)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plan.estimate import estimate, format_table

    est = estimate(resolve_builtin(args.model), args.seq_len, args.batch, args.r, args.target, args.optim,
                   args.checkpointing, args.gpus)
    if args.json:
        print(json.dumps(est.as_json(), indent=2))
    else:
        print(format_table(est, f"{args.model}: seq {args.seq_len} x batch {args.batch}, LoRA r={args.r} on {args.target}, "
                                f"{args.optim}, checkpointing {'on' if args.checkpointing else 'off'}, {args.gpus} GPU(s)"))
    return 0
