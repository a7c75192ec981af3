"""One QLoRA training step (forward + backward) of a ~170M-parameter Llama: nf4tune vs transformers + peft + bitsandbytes.

    python benchmarks/train_step.py [--steps 3] [--device cpu] [--batch 4] [--seq 256]
    python benchmarks/train_step.py --hidden 768 --layers 6 --heads 12 --intermediate 2048 --vocab 16000 \
        --batch 4 --seq 384 --loss labels --optimizer

Model: by default hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 32000 (168M parameters);
--hidden/--layers/--heads/--kv-heads (GQA)/--intermediate/--vocab give other shapes. Random bf16
weights built once into a temporary folder. LoRA r=16, alpha=16, dropout 0.05 on every linear
layer of the blocks, gradient checkpointing on for both. The peer runs as QLoRA users run it:
`BitsAndBytesConfig(nf4, double quant, bf16 compute)`, `prepare_model_for_kbit_training`,
`get_peft_model`. Each side runs in its own process, so peak memory (RSS, sampled every 2 ms during
the steps; and the whole process's peak including loading) is its own. With `--loss chunked`
(the default) each side computes the loss its own way: the peer through the model (full logits),
nf4tune as its training loop does (`loss_sum`, from the hidden states, a chunk of tokens at a time);
with `--loss labels` both go through the public `model(input_ids=..., labels=...).loss` (nf4tune's
then is its chunked loss too). `--optimizer` adds a `torch.optim.AdamW` step (lr 1e-4) over the
trainable parameters to each side's step, as a training loop does.
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
from harness import build_random_llama, load_peft_bnb, peak_rss_bytes, timed_steps  # noqa: E402
from harness import run_side as run_child

CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
# command-line flag -> LlamaConfig field
SHAPE_FLAGS = {"hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
               "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size"}


def model_config(args) -> dict:
    """CONFIG with the shape flags given on the command line (kv heads default to the heads: no GQA)."""
    config = dict(CONFIG)
    for flag, field in SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            config[field] = getattr(args, flag)
    if args.kv_heads is None and args.heads is not None:
        config["num_key_value_heads"] = args.heads
    config["max_position_embeddings"] = max(config["max_position_embeddings"], args.seq)
    return config


def build(path: Path, config: dict) -> None:
    build_random_llama(path, config)


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
    optimizer = None
    if args.optimizer:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        if side.startswith("nf4tune") and args.loss == "chunked":  # nf4tune's training loss: from the hidden states
            from nf4tune.models.loss import loss_sum

            total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            loss = total / count
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        sync()
        return loss.item()

    first_loss = step()  # warm-up: compilation, allocator
    cpu_start = time.process_time()
    times, peak = timed_steps(step, args.steps)
    cpu_s = (time.process_time() - cpu_start) / args.steps  # what the step costs, whatever else the machine runs
    result = {
        "side": side,
        "step_s": statistics.median(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "cpu_s_per_step": cpu_s,
        "threads": torch.get_num_threads(),
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
    for flag in SHAPE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"the model's {SHAPE_FLAGS[flag]}")
    parser.add_argument("--loss", choices=("chunked", "labels"), default="chunked",
                        help="labels: both sides through model(input_ids=..., labels=...).loss")
    parser.add_argument("--optimizer", action="store_true", help="an AdamW step in each side's step")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return

    shape = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SHAPE_FLAGS if getattr(args, flag) is not None]
    shape += ["--loss", args.loss] + (["--optimizer"] if args.optimizer else [])
    config = model_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), config)
        results = []
        for side in args.sides.split(","):
            results.append(run_child(__file__, side, "--model", tmp, "--steps", str(args.steps), "--device", args.device,
                                     "--batch", str(args.batch), "--seq", str(args.seq), *shape))
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} x {args.seq}, "
          f"{' '.join(f'{k}={v}' for k, v in config.items())}, loss {args.loss}, optimizer {args.optimizer}")
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
