"""nf4tune's MoE training step with the grouped experts pass against the per-expert loop it replaced
(`nf4tune_reference`), in one process, the two alternating (A B, B A, ...), timed in CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/moe_paired.py [--shape small|experts] [--rounds 3]

The model is benchmarks/moe_step.py's (`--shape`), LoRA r=16 on the attention and every expert, gradient
checkpointing on, batch 2 x 256. On a shared machine CPU seconds of one thread are the steadiest measure
(wall time counts other processes' turns; with several threads, CPU time counts their spinning).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import moe_step  # noqa: E402

IMPLEMENTATIONS = ("nf4tune", "nf4tune_reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(moe_step.SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from nf4tune.models.loss import loss_sum

    with tempfile.TemporaryDirectory() as tmp:
        moe_step.build(Path(tmp), args.shape)
        model = moe_step.load_side("nf4tune", Path(tmp), "cpu")
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, moe_step.SHAPES[args.shape]["vocab_size"], (2, 256), generator=gen)

    def step():
        total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        (total / count).backward()
        model.zero_grad(set_to_none=True)

    for name in IMPLEMENTATIONS:  # warm-up
        model.set_experts_implementation(name)
        step()
    seconds = {name: [] for name in IMPLEMENTATIONS}
    for r in range(args.rounds):
        for name in IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]:
            model.set_experts_implementation(name)
            start = time.process_time()
            step()
            seconds[name].append(time.process_time() - start)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"# shape {args.shape}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| experts implementation | step CPU s (median) | steps |")
    print("|---|---|---|")
    for name, v in seconds.items():
        print(f"| {name} | {median[name]:.2f} | {', '.join(f'{s:.2f}' for s in v)} |")
    print(f"\ngrouped / loop speed: {median['nf4tune_reference'] / median['nf4tune']:.2f}x")


if __name__ == "__main__":
    main()
