"""Quantize / dequantize speed of nf4tune vs bitsandbytes (NF4 + double quantization, bf16 weights).

    python benchmarks/quantize_speed.py [--repeat 5] [--device cpu|cuda]

Both run in this process on the same machine and threads; the first call of each (compilation,
caches) is timed apart and left out of the medians. Prints a table and the nf4tune / bnb ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import nf4tune

SHAPES = [(4096, 4096), (14336, 4096)]


def timed(fn, repeat: int, sync) -> tuple[float, float]:
    """(first call seconds, median of `repeat` later calls)."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}" + (f", bitsandbytes {__import__('bitsandbytes').__version__}" if bnb else ""))
    print("| weight | op | nf4tune ms | bnb ms | bnb / nf4tune | nf4tune first call ms |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        w = torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02
        q = nf4tune.quantize(w)
        ours = {
            "quantize": timed(lambda: nf4tune.quantize(w), args.repeat, sync),
            "dequantize": timed(lambda: q.dequantize(torch.bfloat16), args.repeat, sync),
        }
        theirs = {}
        if bnb is not None:
            packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            theirs = {
                "quantize": timed(lambda: bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                                  args.repeat, sync),
                "dequantize": timed(lambda: bnb.dequantize_4bit(packed, state), args.repeat, sync),
            }
            assert torch.equal(q.packed, packed), "nf4tune and bitsandbytes disagree on the packed bytes"
        for op, (first, ms) in ours.items():
            if op in theirs:
                ratio = f"{theirs[op][1] / ms:.2f}x"
                bnb_ms = f"{theirs[op][1] * 1e3:.1f}"
            else:
                ratio = bnb_ms = "-"
            print(f"| {shape[0]}x{shape[1]} bf16 | {op} | {ms * 1e3:.1f} | {bnb_ms} | {ratio} | {first * 1e3:.0f} |")
        if device.type == "cuda":
            gbytes = (q.nbytes + w.numel() * 2) / 1e9
            bw = gbytes / ours["dequantize"][1]
            print(f"|  | dequantize bandwidth | {bw:.0f} GB/s |  |  |  |")


if __name__ == "__main__":
    main()
