"""Optimizer step time and state memory: nf4tune PagedAdamW (32-bit, 8-bit) vs torch.optim.AdamW.

    python benchmarks/optim_step.py [--params 40] [--device cpu] [--repeat 5]

Parameters shaped like LoRA adapters of a 7B model (r=64 against 4096- and 11008-wide layers) adding
up to about --params million; float32, random gradients. Medians of --repeat steps after a warm-up
step. On CUDA it also reports GPU-resident state memory with paging on and off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nf4tune.optim import PagedAdamW, PagedAdamW8bit


def make_params(million: int, device) -> list[torch.nn.Parameter]:
    shapes, total = [], 0
    while total < million * 1e6:
        for shape in ((64, 4096), (4096, 64), (64, 11008), (11008, 64)):
            shapes.append(shape)
            total += shape[0] * shape[1]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
    return params


def measure(cls, params, repeat, device, **kw) -> tuple[float, int, float]:
    opt = cls(params, lr=1e-4, **kw)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt.step()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    on_device = sum(t.nbytes for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.device.type == device.type)
    return statistics.median(times), state, on_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=40, help="millions of parameters")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    params = make_params(args.params, device)
    n = sum(p.numel() for p in params)
    print(f"# {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {n / 1e6:.1f}M float32 parameters")
    print("| optimizer | step ms | state MiB | state bytes / parameter | state on device MiB |")
    print("|---|---|---|---|---|")
    runs = [("torch.optim.AdamW", torch.optim.AdamW, {}), ("nf4tune PagedAdamW (32-bit)", PagedAdamW, {}),
            ("nf4tune PagedAdamW8bit", PagedAdamW8bit, {})]
    if device.type == "cuda":
        runs += [("PagedAdamW, paging on", PagedAdamW, {"paging": True}),
                 ("PagedAdamW8bit, paging on", PagedAdamW8bit, {"paging": True})]
    for name, cls, kw in runs:
        seconds, state, on_device = measure(cls, params, args.repeat, device, **kw)
        print(f"| {name} | {seconds * 1e3:.1f} | {state / 2**20:.1f} | {state / n:.3f} | {on_device / 2**20:.1f} |")


if __name__ == "__main__":
    main()
