"""The QLoRA training step, paired and interleaved in one process: CPU seconds per step of nf4tune with its
frozen products in bf16 (`bf16`), in float32 (`f32`), in float32 with SDPA in float32 too (`f32attn`, an
experiment), and of transformers + PEFT + bitsandbytes (`peer`).

    OMP_NUM_THREADS=1 python benchmarks/train_step_paired.py MODEL_DIR --batch 4 --seq 384 --rounds 5

Each step is `model(input_ids=..., labels=...).loss`, backward and a `torch.optim.AdamW` step (lr 1e-4), on
random tokens (seed 0). Both models are loaded, then each round runs one step of every side (in
alternating order), so a machine busy with other work slows all sides alike; CPU time (`process_time`) is
what the step costs whatever else runs. Ratios are peer / side, round by round. Memory is not measured
here (both models share the process): `train_step.py` measures it, one side per process. MODEL_DIR is a
bf16 checkpoint (`harness.build_random_llama`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import load_peft_bnb  # noqa: E402

F32_SDPA = "sdpa_float32"


def sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa with q, k, v in float32 (bf16 training), the output back in their dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sides", default="bf16,f32,f32attn,peer")
    args = parser.parse_args()
    sides = args.sides.split(",")

    from transformers import AttentionInterface

    import nf4tune

    AttentionInterface.register(F32_SDPA, sdpa_float32)
    ours, _ = nf4tune.load_model(args.model, device="cpu", progress=False,
                                 lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.05))
    models = {"ours": ours.train()}
    if "peer" in sides:
        models["peer"] = load_peft_bnb(args.model, "cpu").train()
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(side: str) -> float:
        name = "peer" if side == "peer" else "ours"
        if name == "ours":
            os.environ["NF4TUNE_TRAIN_MATMUL"] = "bfloat16" if side == "bf16" else "float32"
            ours.set_attn_implementation(F32_SDPA if side == "f32attn" else "sdpa")
        model, start = models[name], time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizers[name].step()
        model.zero_grad(set_to_none=True)
        return time.process_time() - start

    for side in sides:  # warm-up: compilation, allocator
        step(side)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            times[side].append(step(side))
        print(json.dumps({side: round(t[-1], 3) for side, t in times.items()}), flush=True)
    print(f"# CPU s per step, {torch.get_num_threads()} thread(s), batch {args.batch} x {args.seq}, {args.rounds} rounds")
    print("| side | median | min | max | peer / side (median, min-max over rounds) |")
    print("|---|---|---|---|---|")
    for side, t in times.items():
        ratio = ""
        if "peer" in times:
            per_round = [p / x for p, x in zip(times["peer"], t)]
            ratio = f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        print(f"| {side} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
