"""`nf4tune quantize`: a Hugging Face checkpoint to a bitsandbytes-compatible 4-bit checkpoint."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import Nf4tuneError
from ..registry import BITSANDBYTES_QUANT_TYPES, BLOCKSIZES, COMPUTE_DTYPES
from .checks import check_model_location, resolve_builtin


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a checkpoint to 4-bit (loadable by transformers + bitsandbytes)",
        description="Quantize every linear layer of a Hugging Face causal LM to 4-bit NF4/FP4, streaming shard by "
        "shard, into a checkpoint that transformers + bitsandbytes (and nf4tune) load directly.",
    )
    p.add_argument("model_dir", nargs="?", help="folder of a Hugging Face checkpoint (config.json + *.safetensors)")
    p.add_argument("out_dir", help="new folder for the 4-bit checkpoint")
    p.add_argument("--quant-type", choices=BITSANDBYTES_QUANT_TYPES, default="nf4")  # what bitsandbytes reads
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="keep absmax in float32")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="N",
                   help="elements per quantization block (32..4096, powers of two; default 64)")
    p.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default="bfloat16",
                   help="compute dtype recorded in quantization_config (default bfloat16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new one is complete; never the input)")
    p.add_argument("--demo", action="store_true",
                   help="build a tiny random Llama checkpoint in OUT_DIR/tiny-llama and quantize it (no download)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.demo:
        return _demo(args)
    if args.model_dir is None:
        raise Nf4tuneError("give MODEL_DIR and OUT_DIR (or --demo OUT_DIR).")
    check_model_location(args.model_dir)
    import torch

    from ..checkpoint.quantize import quantize_checkpoint

    report = quantize_checkpoint(resolve_builtin(args.model_dir), args.out_dir, args.quant_type, args.double_quant,
                                 args.blocksize, getattr(torch, args.compute_dtype), overwrite=args.overwrite)
    _print_report(report, args)
    return 0


def _print_report(report, args: argparse.Namespace) -> None:
    from ..quant import bits_per_parameter

    bits = bits_per_parameter(args.blocksize, args.double_quant)
    print(f"wrote {report.out_dir}")
    print(f"  {report.quantized} linear weights quantized to {args.quant_type} "
          f"({report.quantized_params:,} parameters at {bits:.3f} bits each), {report.kept} tensors kept as they were")
    print(f"  {report.source_bytes / 2**20:.2f} MiB -> {report.output_bytes / 2**20:.2f} MiB")


def _demo(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    from ..checkpoint.hf import iter_tensors, open_checkpoint
    from ..checkpoint.quantize import quantize_checkpoint
    from ..checkpoint.tiny import build_tiny_checkpoint
    from ..quant import QuantizedTensor

    root = Path(args.out_dir)
    source, target = root / "tiny-llama", root / f"tiny-llama-bnb-4bit-{args.quant_type}"
    for d in (source, target):
        shutil.rmtree(d, ignore_errors=True)
    build_tiny_checkpoint(source, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_shard_size="1MB")
    print(f"built a random tiny Llama in {source}")
    report = quantize_checkpoint(source, target, args.quant_type, args.double_quant, args.blocksize,
                                 getattr(torch, args.compute_dtype))
    _print_report(report, args)

    # Read the 4-bit weights back and measure how far they are from the originals.
    quantized = {}
    for shard in open_checkpoint(target).shards:
        quantized.update(load_file(shard))
    worst = 0.0
    for shard in open_checkpoint(source).shards:
        for key, w in iter_tensors(shard):
            if f"{key}.absmax" in quantized:
                back = QuantizedTensor.from_bnb_state_dict(quantized, key).dequantize(torch.float32)
                worst = max(worst, ((back - w.float()).norm() / w.float().norm()).item())
    print(f"  read back: worst relative error of a weight {worst:.3f} "
          "(4-bit rounding of random weights; transformers + bitsandbytes load this folder as it is)")
    return 0
