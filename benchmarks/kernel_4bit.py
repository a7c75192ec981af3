"""The fused 4-bit CPU kernel (`matmul_4bit` of kernels/cpu_kernels.cpp) of this checkout against an older one's.

    OMP_NUM_THREADS=1 python benchmarks/kernel_4bit.py --tree PATH_OF_AN_OLDER_CHECKOUT [--x bf16|f32]
        [--shapes 1536x576,2752x1024,...]

Both kernel sources are built with the flags nf4tune builds with and called through ctypes on the same NF4 weights
(double quantization, blocksize 64), several of each shape so that each call reads its weight from beyond the L2
cache (about 48 MB in all), with 1, 2, 4 and 8 rows of x. Nine rounds, the two builds and the row counts interleaved;
the best time of each (this machine is shared: the minimum is the least disturbed). Also prints each build's largest
error against a float64 product with the dequantized weight, relative to the largest output.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from nf4tune.kernels import cpu  # noqa: E402
from nf4tune.quant.tensor import quantize  # noqa: E402

ROWS = (1, 2, 4, 8)


def build(source: Path, target: Path) -> ctypes.CDLL:
    subprocess.run(["g++", *cpu.FLAGS, str(source), "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    lib.matmul_4bit.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_int]
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="an older checkout to compare with")
    parser.add_argument("--x", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--shapes", default="1536x576,576x1536,2752x1024,1024x2752,4096x4096,4096x11008,11008x4096")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.x == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(Path(args.tree) / "src/nf4tune/kernels/cpu_kernels.cpp", Path(tmp) / "older.so"),
                build(cpu.SOURCE, Path(tmp) / "this.so")]
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        print(f"# {args.x} x, {threads} threads; best of 9 rounds, us per call: older / this (speed-up); error older / this")
        print("| weight (N x K) | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in ROWS) + " | error |")
        print("|---|" + "---|" * (len(ROWS) + 1))
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            weights = [cpu.Matmul4bit(quantize(torch.randn(n, k).bfloat16(), "nf4", 64, double_quant=True))
                       for _ in range(max(1, 48_000_000 // (n * k)))]
            xs = {r: torch.randn(r, k).to(dtype) for r in ROWS}
            outs = {r: torch.empty(r, n) for r in ROWS}
            best = {(r, j): float("inf") for r in ROWS for j in range(2)}
            for round_ in range(9):
                for r in ROWS:
                    for j in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                        start = time.perf_counter()
                        for w in weights:
                            libs[j].matmul_4bit(xs[r].data_ptr(), int(dtype == torch.bfloat16), r, w.weight_ref,
                                                outs[r].data_ptr(), 1, threads)
                        best[r, j] = min(best[r, j], (time.perf_counter() - start) / len(weights))
            exact = xs[4].double() @ weights[0].q.dequantize(torch.float32).double().t()
            errors = []
            for lib in libs:
                lib.matmul_4bit(xs[4].data_ptr(), int(dtype == torch.bfloat16), 4, weights[0].weight_ref,
                                outs[4].data_ptr(), 1, threads)
                errors.append(((outs[4].double() - exact).abs().max() / exact.abs().max()).item())
            cells = [f"{best[r, 0] * 1e6:.0f} / {best[r, 1] * 1e6:.0f} ({best[r, 0] / best[r, 1]:.2f}x)" for r in ROWS]
            print(f"| {n} x {k} | " + " | ".join(cells) + f" | {errors[0]:.0e} / {errors[1]:.0e} |", flush=True)


if __name__ == "__main__":
    main()
