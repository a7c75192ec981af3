"""Long sequences, batch 1: one QLoRA training step's speed and memory, nf4tune vs transformers + PEFT + bitsandbytes.

    python benchmarks/long_context.py [--shapes a,b] [--seqs 2048,8192,16384] [--sides nf4tune,peft-bnb]
                                      [--budget-gib 6]

Models: random bf16 Llamas, vocab 32000, 4 layers: shape `a` hidden 512, 8 heads, intermediate 1408;
shape `b` hidden 1024, 16 query heads sharing 4 key/value heads (GQA), intermediate 2816. LoRA r=16,
alpha 16, dropout 0.05 on every linear layer of the blocks, gradient checkpointing on both sides. The
peer is the usual QLoRA script (`harness.load_peft_bnb`) with transformers' default attention (sdpa, its
best on CPU: the fused flash kernel) and its loss through the model (full logits); nf4tune's step is its
training loop's (`models.loss.loss_sum`: chunked loss; long-sequence attention, tiled MLP and kept-outputs
budget chosen by length). `nf4tune-short-path` is nf4tune with those three turned off (sdpa attention, MLP
untiled, the fixed 1 GiB kept-outputs budget): what nf4tune did before them.

Each run is its own process: load, warm-up steps of 256 and 320 tokens (first-call costs such as
nf4tune's compiled loss kernel, which compiles again for a second length), then the measured step
(forward + backward); step memory = peak resident memory sampled every 2 ms during that step minus the
resident memory after loading. `--budget-gib` marks which runs fit that budget.
Speed is reported as wall-clock tokens/s and as tokens per CPU-second of the process: the runs use
`--threads` (default 1) compute threads each, and `--parallel` runs (default 2: the two sides at one length)
go at once, since on a machine shared with other work the CPU time of a single-threaded run is what stays
comparable (wall time there mostly measures the other work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import PeakRSS, build_random_llama, load_peft_bnb, rss_bytes  # noqa: E402
from harness import run_side as run_child  # noqa: E402

SHAPES = {
    "a": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4),
}
VOCAB = 32000
WARMUP_TOKENS = (256, 320)


def load_side(side: str, path: Path):
    if side.startswith("nf4tune"):
        import nf4tune

        model, _ = nf4tune.load_model(path, device="cpu", progress=False,
                                      lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.05))
        if side == "nf4tune-short-path":
            from nf4tune.layers import kept_outputs
            from nf4tune.layers.tiled_mlp import untile_mlps

            model.set_attn_implementation("sdpa")
            untile_mlps(model)
            kept_outputs.FULL_BUDGET_TOKENS = 1 << 40
        return model
    return load_peft_bnb(path, "cpu", r=16, alpha=16, dropout=0.05)


def step(side: str, model, ids: torch.Tensor) -> torch.Tensor:
    if side.startswith("nf4tune"):  # nf4tune's training loss: chunked, from the hidden states
        from nf4tune.models.loss import loss_sum

        total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        loss = total / count
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def run_side(side: str, path: Path, seq: int) -> dict:
    model = load_side(side, path)
    model.train()
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    loaded = rss_bytes()
    for warmup in WARMUP_TOKENS:  # first-call costs out of the timing: nf4tune's compiled loss kernel compiles for
        step(side, model, ids[:, :warmup])  # the first length, then once more for any (dynamic shapes)
    with PeakRSS() as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(side, model, ids)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"side": side, "seq": seq, "step_s": seconds, "tokens_per_s": seq / seconds, "cpu_s": cpu_seconds,
            "tokens_per_cpu_s": seq / cpu_seconds,
            "step_memory_gib": (peak.peak - loaded) / 2**30, "loss": loss.item(),
            "attention": model.config._attn_implementation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="a,b")
    parser.add_argument("--seqs", default="2048,8192,16384")
    parser.add_argument("--sides", default="nf4tune,peft-bnb")
    parser.add_argument("--budget-gib", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one run, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args.seq)))
        return

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's compute threads
    print(f"# cpu, {args.threads} thread(s) per run, {args.parallel} run(s) at once, torch {torch.__version__}, batch 1")
    print("| shape | tokens | side | step s (wall) | tokens/s (wall) | CPU s | tokens per CPU-s | step memory GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        runs = []
        for shape in args.shapes.split(","):
            path = Path(tmp, shape)
            build_random_llama(path, {**SHAPES[shape], "vocab_size": VOCAB, "max_position_embeddings": 131072})
            for seq in (int(s) for s in args.seqs.split(",")):
                for side in args.sides.split(","):
                    runs.append((shape, pool.submit(run_child, __file__, side, "--model", str(path), "--seq", str(seq))))
        for shape, run in runs:
            r = {**run.result(), "shape": shape}
            results.append(r)
            fits = "" if r["step_memory_gib"] <= args.budget_gib else f" (over {args.budget_gib:g} GiB)"
            print(f"| {shape} | {r['seq']} | {r['side']} | {r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['cpu_s']:.1f} | "
                  f"{r['tokens_per_cpu_s']:.0f} | {r['step_memory_gib']:.2f}{fits} | {r['loss']:.3f} |", flush=True)
    by = {(r["shape"], r["seq"], r["side"]): r for r in results}
    for (shape, seq, side), r in by.items():
        peer = by.get((shape, seq, "peft-bnb"))
        if side == "nf4tune" and peer:
            print(f"shape {shape}, {seq} tokens: nf4tune / peft-bnb tokens per CPU-s "
                  f"{r['tokens_per_cpu_s'] / peer['tokens_per_cpu_s']:.2f}x, "
                  f"step memory {r['step_memory_gib'] / peer['step_memory_gib']:.2f}x")


if __name__ == "__main__":
    main()
