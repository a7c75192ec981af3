"""Memory of `model(input_ids, attention_mask, labels=...)` with a large vocabulary: nf4tune's chunked loss vs full logits.

    python benchmarks/labels_loss_memory.py [--batch 2] [--seq 1024] [--vocab 128256] [--hidden 512]
                                            [--layers 2] [--steps 3] [--rounds 1] [--device cpu]
                                            [--sides ...]

Model: a random bf16 Llama with Llama-3's 128,256-token vocabulary and a small body (hidden 512,
2 layers, intermediate 1408, 8 heads), untied head, so the head and its batch x seq x vocab logits
dominate a training step. One training step = `model(input_ids=..., attention_mask=..., labels=...)`
in train mode, then `.loss.backward()`; every token is labelled. The sides, each in its own process:

- `nf4tune`: `nf4tune.load_model(path, lora=nf4tune.LoraConfig(r=16, alpha=16))` (gradient
  checkpointing on, its default); the call computes the loss with nf4tune's chunked loss from the
  hidden states (no logits tensor; `logits` is None).
- `nf4tune-full-logits`: the same model and call with `skip_logits=False`: transformers' own forward
  and `ForCausalLMLoss` through the full logits.
- `peft-bnb`: the usual QLoRA script (transformers + bitsandbytes NF4 with double quantization and
  bf16 compute, `prepare_model_for_kbit_training` with gradient checkpointing, `get_peft_model` r=16,
  alpha 16, dropout 0.05 on every linear layer of the blocks), the same call. PEFT's preparation
  casts the 16-bit head and embeddings to float32, so its logits are float32 from the start.

One warm-up step, then --steps measured steps (gradients dropped after each); with --rounds N every
side runs N times, the sides interleaved. Reported per side: the loss (LoRA B starts at zero, so all
sides compute the same function; nf4tune against full logits must agree within float32 rounding),
the median step time (over steps, then rounds), the peak resident memory sampled every 2 ms
during the measured steps above the resident memory just before them (on CUDA also
`torch.cuda.max_memory_allocated` above `memory_allocated` before them), and the whole process's peak.
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
from harness import build_random_llama, load_peft_bnb, peak_rss_bytes, rss_bytes, timed_steps  # noqa: E402
from harness import run_side as run_child  # noqa: E402

SIDES = ("nf4tune", "nf4tune-full-logits", "peft-bnb")


def config(args) -> dict:
    return dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab, max_position_embeddings=4096)


def load_side(side: str, path: Path, device: str):
    if side.startswith("nf4tune"):
        import nf4tune

        model, _ = nf4tune.load_model(path, device=device, lora=nf4tune.LoraConfig(r=16, alpha=16), progress=False)
        return model
    return load_peft_bnb(path, device, r=16, alpha=16, dropout=0.05)


def run_side(side: str, path: Path, args) -> dict:
    torch.manual_seed(0)
    model = load_side(side, path, args.device)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    extra = {"skip_logits": False} if side == "nf4tune-full-logits" else {}
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> tuple[float, bool]:
        out = model(input_ids=ids, attention_mask=mask, labels=ids, **extra)
        out.loss.backward()
        loss, has_logits = out.loss.item(), out.logits is not None
        del out
        model.zero_grad(set_to_none=True)
        sync()
        return loss, has_logits

    loss, has_logits = step()  # warm-up: allocator, compiled kernels
    before_rss = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    times, peak = timed_steps(step, args.steps)
    result = {"side": side, "loss": loss, "logits_returned": has_logits, "step_s": statistics.median(times),
              "peak_rss_step_mib": (peak - before_rss) / 2**20, "peak_rss_process_gib": peak_rss_bytes() / 2**30}
    if cuda:
        result["peak_cuda_step_mib"] = (torch.cuda.max_memory_allocated() - before_cuda) / 2**20
    return result


def summarize(runs: list[dict]) -> dict:
    """One side over the rounds: the median step time, the largest peaks, the first round's loss."""
    out = dict(runs[0], step_s=statistics.median(r["step_s"] for r in runs))
    for key in ("peak_rss_step_mib", "peak_cuda_step_mib", "peak_rss_process_gib"):
        if key in out:
            out[key] = max(r[key] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every side, interleaved (the machine drifts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return

    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
             "--layers", str(args.layers), "--steps", str(args.steps), "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        build_random_llama(Path(tmp), config(args), max_shard_size="500MB")
        runs = {side: [] for side in args.sides.split(",")}
        for _ in range(args.rounds):
            for side in runs:
                runs[side].append(run_child(__file__, side, "--model", tmp, *shape))
    results = [summarize(side_runs) for side_runs in runs.values()]
    cuda = args.device.startswith("cuda")
    full = next((r for r in results if r["side"] == "nf4tune-full-logits"), None)
    print(f"# python benchmarks/labels_loss_memory.py {' '.join(shape)} --rounds {args.rounds}")
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; vocab {args.vocab}, hidden "
          f"{args.hidden}, {args.layers} layers; batch {args.batch} x {args.seq} tokens (full logits: "
          f"{args.batch * args.seq * args.vocab * 2 / 2**20:.0f} MiB in bf16, twice that in float32)")
    print("| side | loss | rel. diff vs full logits | logits returned | step s | peak RSS in step MiB |"
          + (" peak CUDA in step MiB |" if cuda else "") + " peak RSS process GiB |")
    print("|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for r in results:
        diff = f"{abs(r['loss'] - full['loss']) / abs(full['loss']):.1e}" if full else "-"
        print(f"| {r['side']} | {r['loss']:.6f} | {diff} | {'yes' if r['logits_returned'] else 'no'} | {r['step_s']:.2f} | "
              f"{r['peak_rss_step_mib']:.0f} |" + (f" {r['peak_cuda_step_mib']:.0f} |" if cuda else "")
              + f" {r['peak_rss_process_gib']:.2f} |")
    by_side = {r["side"]: r for r in results}
    key = "peak_cuda_step_mib" if cuda else "peak_rss_step_mib"
    others = [side for side in ("nf4tune-full-logits", "peft-bnb") if side in by_side and "nf4tune" in by_side]
    if others:
        print()
    for other in others:
        ours, theirs = by_side["nf4tune"], by_side[other]
        print(f"nf4tune vs {other}: peak {'CUDA' if cuda else 'RSS'} in step {ours[key]:.0f} vs {theirs[key]:.0f} MiB "
              f"({ours[key] / max(theirs[key], 1e-9):.2f}x); step time {ours['step_s']:.2f} vs {theirs['step_s']:.2f} s")


if __name__ == "__main__":
    main()
