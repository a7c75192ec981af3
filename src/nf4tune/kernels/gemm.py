"""Matrix products of bfloat16 tensors computed in float32 a block of rows at a time, and which dtype
PyTorch's CPU matrix multiplication is faster in here, bfloat16 or float32, measured once.

On CPUs without AMX, oneDNN's bf16 GEMM (`brg_matmul:avx512_core_bf16`) ran at about half float32's
speed at training shapes on the 2-core Xeon of BENCHMARKS.md ("The step at 1.5x"), conversions
included: the dot-product instruction does no more work per cycle than two float32 FMAs, and packing
costs the rest. With AMX tiles bf16 is several times faster instead. Which one holds is a property of
the CPU (and of the oneDNN build), so it is measured on the first call instead of guessed from flags.
"""

from __future__ import annotations

import functools
import time

import torch

# Long enough to measure (a few milliseconds each), small enough to cost nothing at startup.
_M, _K, _N = 256, 768, 1024
_TRIES = 3
# float32 must win by this margin: it pays for converting the activations, which the probe includes.
MARGIN = 0.8


def _best_seconds(fn) -> float:
    """The least CPU time of this thread over a few calls: a preempted call on a busy machine does
    not count its wait."""
    best = float("inf")
    for _ in range(_TRIES):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


@functools.cache
def float32_gemm_faster() -> bool:
    """Whether x @ W^T for bfloat16 x is faster as float32 (x converted, the result rounded back) than as
    bfloat16 on this CPU. Timed on one thread (a core's throughput, which is what differs between the
    two; on a busy machine a multi-threaded timing measures the scheduler), by this thread's CPU time,
    the best of a few runs each, taken alternately."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_M, _K, generator=gen).to(torch.bfloat16)
    w = torch.randn(_N, _K, generator=gen).to(torch.bfloat16)
    w32 = w.float()
    bf16 = lambda: x @ w.t()  # noqa: E731
    f32 = lambda: (x.float() @ w32.t()).to(torch.bfloat16)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16(), f32()  # first calls: oneDNN's kernel generation, allocations
        t_bf16, t_f32 = float("inf"), float("inf")
        for _ in range(2):
            t_bf16, t_f32 = min(t_bf16, _best_seconds(bf16)), min(t_f32, _best_seconds(f32))
    finally:
        torch.set_num_threads(threads)
    return t_f32 < MARGIN * t_bf16


# Rows of x converted and multiplied at a time by `matmul_in`: its float32 copies of a block of x and of
# its product stay a few MiB whatever the number of tokens, and 512-row GEMMs run at full speed.
ROWS = 512


def matmul_in(x: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., K) @ m (K, N) in x's dtype, computed in `dtype` (m already in it): x converted a block of
    `ROWS` rows at a time, each block's product rounded once into the result."""
    if x.dtype == dtype:
        return x @ m
    rows = x.reshape(-1, x.shape[-1])
    out = x.new_empty((rows.shape[0], m.shape[1]))
    for start in range(0, rows.shape[0], ROWS):
        out[start:start + ROWS] = rows[start:start + ROWS].to(dtype) @ m
    return out.view(*x.shape[:-1], m.shape[1])
