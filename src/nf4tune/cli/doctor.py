"""`nf4tune doctor`: which path (reference or fast kernel) each operation takes on this machine, and why."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="show which kernel each operation uses on this machine, and why",
        description="For the CPU and each CUDA device, show which implementation each operation takes "
        "(reference PyTorch, AVX-512, Triton, torch.compile) for a typical 7B-class input, and why.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..dispatch import format_report, quant_type_paths, report

    found = {**report(), "quant_types": quant_type_paths()}
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(format_report(found))
        print("\nquant.quant_type:")
        print("\n".join(f"  {t:<5} {what}" for t, what in found["quant_types"].items()))
    return 0
