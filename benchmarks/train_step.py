"""One QLoRA training step (forward + backward) of a ~170M-parameter Llama: nf4tune vs transformers + peft + bitsandbytes.

    python benchmarks/train_step.py [--steps 3] [--device cpu] [--batch 4] [--seq 256]

Model: hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 32000 (168M parameters), random
bf16 weights built once into a temporary folder. LoRA r=16, alpha=16, dropout 0.05 on every linear
layer of the blocks, gradient checkpointing on for both. The peer runs as QLoRA users run it:
`BitsAndBytesConfig(nf4, double quant, bf16 compute)`, `prepare_model_for_kbit_training`,
`get_peft_model`. Each side runs in its own process, so peak memory (RSS, sampled every 2 ms during
the steps; and the whole process's peak including loading) is its own. Each side computes the loss
its own way: the peer through the model (full logits), nf4tune as its training loop does (from the
hidden states, a chunk of tokens at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import build_random_llama, load_peft_bnb, peak_rss_bytes, timed_steps  # noqa: E402
from harness import run_side as run_child

CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)


def build(path: Path) -> None:
    build_random_llama(path, CONFIG)


def load_side(side: str, path: Path, device: str, compute: torch.dtype):
    if side.startswith("nf4tune"):
        import nf4tune

        model, _ = nf4tune.load_model(path, device=device, compute_dtype=compute, progress=False,
                                      lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.05),
                                      gradient_checkpointing=not side.endswith("-nogc"))
        return model
    return load_peft_bnb(path, device)


def run_side(side: str, path: Path, args) -> dict:
    compute = torch.float32 if side == "nf4tune-fp32" else torch.bfloat16
    model = load_side(side, path, args.device, compute)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        if side.startswith("nf4tune"):  # nf4tune's training loss: chunked, from the hidden states
            from nf4tune.models.loss import loss_sum

            total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            loss = total / count
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        return loss.item()

    first_loss = step()  # warm-up: compilation, allocator
    times, peak = timed_steps(step, args.steps)
    result = {
        "side": side,
        "step_s": statistics.median(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "peak_rss_during_steps_gib": peak / 2**30,
        "peak_rss_process_gib": peak_rss_bytes() / 2**30,
        "first_loss": first_loss,
    }
    if args.device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--sides", default="nf4tune,nf4tune-fp32,peft-bnb")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        results = []
        for side in args.sides.split(","):
            results.append(run_child(__file__, side, "--model", tmp, "--steps", str(args.steps), "--device", args.device,
                                     "--batch", str(args.batch), "--seq", str(args.seq)))
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} x {args.seq}")
    print("| side | step s | tokens/s | peak RSS in steps GiB | peak RSS process GiB | first loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_during_steps_gib']:.2f} | "
              f"{r['peak_rss_process_gib']:.2f} | {r['first_loss']:.3f} |")
    base = {r["side"]: r for r in results}
    if "nf4tune" in base and "peft-bnb" in base:
        print(f"\nnf4tune / peft-bnb tokens/s: {base['nf4tune']['tokens_per_s'] / base['peft-bnb']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
