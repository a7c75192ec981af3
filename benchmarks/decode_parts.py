"""The parts of a decoded token on CPU, one at a time: where the fused 4-bit matmul stops paying,
the 4-bit layers of the ~170M benchmark model, the output head, the strided last-row input
transformers hands the head, and an r=64 adapter's first product in bf16 and float32.

    python benchmarks/decode_parts.py [--repeat 30]

Random weights in the benchmark model's shapes (hidden 1024, intermediate 2816, 8 layers, vocab
32000), NF4 with double quantization, bf16; medians of --repeat calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import nf4tune
from nf4tune import dispatch
from nf4tune.kernels import cpu as native


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if dispatch.native_library()[0] is None:
        raise SystemExit(f"the native kernels are not available here: {dispatch.native_library()[1]}")
    torch.manual_seed(0)
    print(f"# cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")

    q = nf4tune.quantize(torch.randn(2816, 1024, dtype=torch.bfloat16))
    fused = native.Matmul4bit(q)
    print("\n| tokens | fused 4-bit matmul ms | dequantize + bf16 matmul ms |\n|---|---|---|")
    for tokens in (1, 2, 4, 8, 12, 16, 32):
        x = torch.randn(tokens, 1024, dtype=torch.bfloat16)
        a = median_ms(lambda: fused(x), args.repeat)
        b = median_ms(lambda: x @ q.dequantize(torch.bfloat16).t(), args.repeat)
        print(f"| {tokens} | {a:.3f} | {b:.3f} |")

    shapes = [(1024, 1024)] * 4 + [(2816, 1024)] * 2 + [(1024, 2816)]
    layers = [native.Matmul4bit(nf4tune.quantize(torch.randn(*s, dtype=torch.bfloat16))) for _ in range(8) for s in shapes]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (1024, 2816)}
    threads = torch.get_num_threads()
    print("\n| threads | 56 4-bit layers, one token, ms |\n|---|---|")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        print(f"| {n} | {median_ms(lambda: [m(xs[m.k]) for m in layers], args.repeat):.2f} |")
    torch.set_num_threads(threads)

    head = torch.randn(32000, 1024, dtype=torch.bfloat16)
    row = torch.randn(1, 1, 1024, dtype=torch.bfloat16)
    last = torch.randn(1, 128, 1024, dtype=torch.bfloat16)[:, -1:, :]  # what transformers passes the head
    print("\n| output head, one row | ms |\n|---|---|")
    print(f"| torch F.linear | {median_ms(lambda: F.linear(row, head), args.repeat):.2f} |")
    print(f"| native matmul_bf16 | {median_ms(lambda: native.matmul_bf16(row, head), args.repeat):.2f} |")
    print(f"| torch F.linear, hidden[:, -1:, :] view | {median_ms(lambda: F.linear(last, head), args.repeat):.2f} |")

    print("\n| LoRA A product, 1 x 1024 by 1024 x 64 | us |\n|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        x, a = torch.randn(1, 1024, dtype=dtype), torch.randn(64, 1024, dtype=dtype)
        print(f"| {str(dtype).removeprefix('torch.')} | {median_ms(lambda: x @ a.t(), args.repeat * 10) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
