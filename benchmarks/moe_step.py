"""One QLoRA training step (forward + backward) of a mixture-of-experts model: nf4tune vs transformers + peft + bitsandbytes.

    python benchmarks/moe_step.py [--shape small|experts] [--steps 3] [--device cpu] [--batch 2] [--seq 256]

Model (`--shape`), a random Qwen3-MoE with bf16 weights written by `save_pretrained` into a temporary folder:
- small (the default): hidden 512, 4 layers, 8 heads (4 KV), 16 experts of intermediate 768, 2 per token,
  vocab 32000 (~134M parameters, 113M of them in the experts); its memory is mostly the libraries' and the
  vocabulary's (logits), not the experts'.
- experts: hidden 768, 4 layers, 12 heads (4 KV), 64 experts of intermediate 512, 2 per token, vocab 4096
  (~316M parameters, 302M of them in the experts): a model whose memory is its experts'.

LoRA r=16, alpha=16, no dropout (PEFT has none on experts), on every linear layer of the blocks and on the
experts (per expert), gradient checkpointing on for both. The peer is the QLoRA script as users write it for
MoE: `BitsAndBytesConfig(nf4, double quant, bf16 compute)` (which quantizes the linear layers; transformers +
bitsandbytes keep the experts in bf16), `prepare_model_for_kbit_training`, `get_peft_model` with
`target_modules="all-linear"` and `target_parameters` on the experts' fused weights.
Each side runs in its own process, so its memory is its own: the peak RSS sampled every 2 ms during the steps
(warm-up included), "step memory" (that peak less the RSS right after loading: what training adds to the
loaded model) and the whole process's peak (loading included). Times: the median step's wall-clock seconds
and its CPU seconds (the process's, all threads: on a shared machine wall time also counts other
processes' turns, CPU time does not, though it counts threads spinning while they wait).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import PeakRSS, load_bnb, peak_rss_bytes, rss_bytes, timed_steps  # noqa: E402
from harness import run_side as run_child

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=2,
                  vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "experts": dict(hidden_size=768, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=2,
                    vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False),
}
CONFIG = SHAPES["small"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(path: Path, shape: str = "small") -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPES[shape])).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")


def load_side(side: str, path: Path, device: str):
    if side == "nf4tune":
        import nf4tune

        model, _ = nf4tune.load_model(path, device=device, compute_dtype=torch.bfloat16, progress=False,
                                      lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.0))
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_bnb(path, device), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            target_parameters=EXPERTS, task_type="CAUSAL_LM"))


def run_side(side: str, path: Path, args) -> dict:
    model = load_side(side, path, args.device)
    model.train()
    loaded = rss_bytes()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=gen).to(args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step():
        if side == "nf4tune":  # nf4tune's training loss: chunked, from the hidden states
            from nf4tune.models.loss import loss_sum

            total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            loss = total / count
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    cpu_times = []

    def timed_step():
        start = time.process_time()
        step()
        cpu_times.append(time.process_time() - start)

    with PeakRSS() as warm:
        first_loss = step()  # warm-up
    times, peak = timed_steps(timed_step, args.steps)
    peak = max(peak, warm.peak)
    return {
        "side": side,
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "peak_rss_during_steps_gib": peak / 2**30,
        "step_memory_gib": (peak - loaded) / 2**30,
        "peak_rss_process_gib": peak_rss_bytes() / 2**30,
        "first_loss": first_loss,
        "trainable": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--sides", default="nf4tune,peft-bnb")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.shape)
        results = [run_child(__file__, side, "--model", tmp, "--shape", args.shape, "--steps", str(args.steps),
                             "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq))
                   for side in args.sides.split(",")]
    print(f"# shape {args.shape}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch} x {args.seq}, load average {os.getloadavg()[0]:.1f}")
    print("| side | step s | step CPU s | tokens/s | peak RSS in steps GiB | step memory GiB | peak RSS process GiB "
          "| first loss | trainable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_during_steps_gib']:.2f} | {r['step_memory_gib']:.2f} | {r['peak_rss_process_gib']:.2f} | "
              f"{r['first_loss']:.3f} | {r['trainable']} |")
    base = {r["side"]: r for r in results}
    if "nf4tune" in base and "peft-bnb" in base:
        ours, theirs = base["nf4tune"], base["peft-bnb"]
        print(f"\nnf4tune / peft-bnb tokens/s: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (by CPU s: "
              f"{theirs['step_cpu_s'] / ours['step_cpu_s']:.2f}x); peak RSS in steps: "
              f"{ours['peak_rss_during_steps_gib'] / theirs['peak_rss_during_steps_gib']:.2f}x; step memory: "
              f"{ours['step_memory_gib'] / theirs['step_memory_gib']:.2f}x; process peak: "
              f"{ours['peak_rss_process_gib'] / theirs['peak_rss_process_gib']:.2f}x")


if __name__ == "__main__":
    main()
