"""Eager `Linear4bit` overhead: 4 layers (1024 -> 2816, NF4, LoRA r=16) forward + backward on 128 tokens,
and 20 x 4 one-token inference calls, median of 7 (ms). Run it against two checkouts in turn
(PYTHONPATH=<checkout>/src python benchmarks/linear4bit_overhead.py LABEL) to compare them paired.
"""
import statistics
import sys
import time

import torch

import nf4tune

torch.manual_seed(0)
layers = [nf4tune.Linear4bit.from_quantized(nf4tune.quantize(torch.randn(2816, 1024)), compute_dtype=torch.bfloat16)
          for _ in range(4)]
for layer in layers:
    layer.add_lora(16, 16)
x = torch.randn(128, 1024, dtype=torch.bfloat16, requires_grad=True)
def step():
    y = x
    for layer in layers:
        y = layer(y)[:, :1024]
    y.float().sum().backward()
def infer():
    with torch.no_grad():
        for _ in range(20):
            for layer in layers:
                layer(x[:1].detach())
out = {}
for name, fn in (("train_ms", step), ("infer_1tok_x80_ms", infer)):
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    out[name] = round(statistics.median(times), 2)
print(sys.argv[1] if len(sys.argv) > 1 else "", out)
