"""`nf4tune merge`: a LoRA adapter merged into its base model, written as a 16-bit checkpoint."""

from __future__ import annotations

import argparse

from ..registry import BLOCKSIZES, QUANT_TYPES
from .checks import check_adapter_dir, check_model_location, resolve_builtin


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model (16-bit safetensors)",
        description="Merge a LoRA adapter (nf4tune or PEFT format) into the base model's original 16-bit weights and "
        "write a standard sharded safetensors checkpoint with its tokenizer, loadable by transformers, vLLM, TGI "
        "or llama.cpp's converter.",
    )
    p.add_argument("base", help="base model folder or Hub id (16-bit, or *-bnb-4bit)")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out_dir", help="new folder for the merged checkpoint")
    p.add_argument("--dequantized", action="store_true",
                   help="merge into the dequantized 4-bit weights the adapter trained against (the exact trained function)")
    p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4",
                   help="with --dequantized: the 4-bit type used in training")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="with --dequantized")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="N",
                   help="with --dequantized")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new one is complete; never an input)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_model_location(args.base, "the base model")
    check_adapter_dir(args.adapter, "the adapter")
    from ..models.merge import merge_adapter

    report = merge_adapter(resolve_builtin(args.base), args.adapter, args.out_dir, args.dequantized, args.quant_type,
                           args.double_quant, args.blocksize, overwrite=args.overwrite)
    how = "dequantized 4-bit" if report.dequantized else "original 16-bit"
    print(f"wrote {report.out_dir}: {report.merged} weights merged into the {how} base weights")
    return 0
