"""Batch-1 decoding and prefill speed with 4-bit weights: nf4tune vs transformers + bitsandbytes.

    python benchmarks/decode_speed.py [--new-tokens 32] [--prompt 128] [--rounds 3] [--lora-r 0] [--device cpu]

The ~170M-parameter Llama of the training benchmarks (hidden 1024, 8 layers, vocab 32000), random
bf16 weights, NF4 with double quantization, bf16 compute; greedy `generate` with the KV cache.
With --lora-r R, both sides decode through an unmerged LoRA adapter of rank R on every linear layer
(nf4tune's own; peft's on the bitsandbytes model). Each side in its own process, the two alternating
for --rounds rounds (this machine's speed drifts); the medians are reported. Decode tokens/s
excludes the prefill (first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import run_side as run_child  # noqa: E402
from train_step import build  # noqa: E402


def run_side(side: str, path: Path, args) -> dict:
    if side == "nf4tune":
        import nf4tune

        lora = nf4tune.LoraConfig(r=args.lora_r, alpha=16, dropout=0.0) if args.lora_r else None
        model, _ = nf4tune.load_model(path, device=args.device, progress=False, lora=lora)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map=args.device)
        if args.lora_r:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()
    ids = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(n):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = min(timed(1) for _ in range(3))
    total = timed(args.new_tokens)
    return {"prefill_s": prefill, "decode_tokens_per_s": (args.new_tokens - 1) / (total - prefill)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=0, help="decode through a LoRA adapter of this rank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        rounds = {"nf4tune": [], "transformers+bnb": []}
        for _ in range(args.rounds):
            for side in rounds:
                rounds[side].append(run_child(__file__, side, "--model", tmp, "--device", args.device,
                                              "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
                                              "--lora-r", str(args.lora_r)))
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, batch 1, {args.rounds} interleaved rounds, LoRA r={args.lora_r}")
    print("| side | prefill ms per round | decode tokens/s per round | median prefill ms | median decode tokens/s |")
    print("|---|---|---|---|---|")
    median = {}
    for side, rs in rounds.items():
        prefill = [r["prefill_s"] * 1e3 for r in rs]
        decode = [r["decode_tokens_per_s"] for r in rs]
        median[side] = statistics.median(prefill), statistics.median(decode)
        print(f"| {side} | {', '.join(f'{p:.0f}' for p in prefill)} | {', '.join(f'{d:.1f}' for d in decode)} | "
              f"{median[side][0]:.0f} | {median[side][1]:.1f} |")
    (pa, da), (pb, db) = median["nf4tune"], median["transformers+bnb"]
    print(f"\nnf4tune / bnb (medians): decode {da / db:.2f}x, prefill {pb / pa:.2f}x")


if __name__ == "__main__":
    main()
