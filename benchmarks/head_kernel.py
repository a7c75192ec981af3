"""The 16-bit output head while decoding: nf4tune's AVX512-BF16 kernel (`dispatch.head_matmul`) against
PyTorch's bf16 `F.linear`, for 1 to 8 rows, with the weight coming from memory as in a decoding step.

    python benchmarks/head_kernel.py [--vocab 32000] [--hidden 512,576,1024] [--rows 1,2,4,8] [--copies 6]

Each timing cycles over `--copies` separate weights (6 x 32000 x 1024 bf16 = 393 MB), so a call finds its
weight out of the caches, as a decoding step does after the layers' weights went through them. One
thread (OMP_NUM_THREADS=1 is set here); ms per call, and the bytes of the weight read per second.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nf4tune import dispatch  # noqa: E402


def timed(fn, weights, x, rounds: int = 4) -> float:
    for w in weights:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(rounds):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) / (rounds * len(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", default="512,576,1024")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--copies", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, 1 thread, vocab {args.vocab}, {args.copies} weights cycled")
    print("| hidden | rows | nf4tune kernel ms | GB/s | F.linear bf16 ms | GB/s |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for hidden in (int(h) for h in args.hidden.split(",")):
        weights = [(torch.randn(args.vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(args.copies)]
        size = weights[0].nbytes
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
            if not dispatch.path("head_matmul", x, weights[0]).fast:
                raise SystemExit(f"no head kernel here: {dispatch.path('head_matmul', x, weights[0]).reason}")
            ours, theirs = timed(dispatch.head_matmul, weights, x), timed(F.linear, weights, x)
            print(f"| {hidden} | {rows} | {ours * 1e3:.2f} | {size / ours / 1e9:.1f} | {theirs * 1e3:.2f} | "
                  f"{size / theirs / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
