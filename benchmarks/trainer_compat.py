"""transformers `Trainer` training an nf4tune model vs the same `Trainer` script on transformers + peft + bitsandbytes.

    python benchmarks/trainer_compat.py [--steps 4] [--device cpu] [--batch 4] [--seq 384]

Model: Llama, hidden 768, 6 layers, 12 heads, intermediate 2048, vocab 16000, random bf16 weights
built once into a temporary folder. One script for both sides; only the loading lines differ:
nf4tune `load_model(lora=LoraConfig(r=16, alpha=16, dropout=0.05))` against `BitsAndBytesConfig(nf4,
double quant, bf16 compute)` + `prepare_model_for_kbit_training` + `get_peft_model` (r=16, every linear
layer of the blocks), gradient checkpointing on for both (non-reentrant). `TrainingArguments`: bf16,
adamw_torch, constant learning rate, no eval, no saving. Each side runs in its own process; a callback
times each optimizer step (the first, with compilation and allocator warm-up, is left out) and
samples resident memory during the steps.
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
from harness import PeakRSS, build_random_llama, load_peft_bnb, peak_rss_bytes  # noqa: E402
from harness import run_side as run_child  # noqa: E402

CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
              num_key_value_heads=12, vocab_size=16000, max_position_embeddings=2048)


def build(path: Path) -> None:
    build_random_llama(path, CONFIG)


def load_side(side: str, path: Path, device: str):
    if side == "nf4tune":  # the two lines a user changes
        import nf4tune

        model, _ = nf4tune.load_model(path, device=device, progress=False,
                                      lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.05))
        return model
    return load_peft_bnb(path, device)


def run_side(side: str, path: Path, args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = load_side(side, path, args.device)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in torch.randint(0, CONFIG["vocab_size"], (args.batch * (args.steps + 1), args.seq), generator=gen)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.peak, self.start = [], None, 0.0

        def on_step_begin(self, *a, **k):
            if self.times and self.peak is None:  # after the warm-up step
                self.peak = PeakRSS().__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    targs = TrainingArguments(output_dir=str(path / f"out-{side}"), max_steps=args.steps + 1,
                              per_device_train_batch_size=args.batch, learning_rate=1e-4, lr_scheduler_type="constant",
                              bf16=True, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                              use_cpu=args.device == "cpu", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[timer])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timer.peak.__exit__(None, None, None)
    step = statistics.median(timer.times[1:])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"side": side, "step_s": step, "tokens_per_s": args.batch * args.seq / step,
              "peak_rss_during_steps_gib": timer.peak.peak / 2**30, "peak_rss_process_gib": peak_rss_bytes() / 2**30,
              "first_loss": losses[0]}
    if args.device == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--sides", default="nf4tune,peft-bnb")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, JSON out
        print(json.dumps(run_side(args.side, Path(args.model), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        results = [run_child(__file__, side, "--model", tmp, "--steps", str(args.steps), "--device", args.device,
                             "--batch", str(args.batch), "--seq", str(args.seq)) for side in args.sides.split(",")]
    print(f"# Trainer, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch} x {args.seq}")
    cuda = args.device == "cuda"
    print("| side | step s | tokens/s | peak RSS in steps GiB | peak RSS process GiB |" + (" peak CUDA GiB |" if cuda else "")
          + " first loss |")
    print("|---|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for r in results:
        print(f"| {r['side']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_during_steps_gib']:.2f} | "
              f"{r['peak_rss_process_gib']:.2f} |" + (f" {r['peak_cuda_gib']:.2f} |" if cuda else "")
              + f" {r['first_loss']:.3f} |")
    by_side = {r["side"]: r for r in results}
    if "nf4tune" in by_side and "peft-bnb" in by_side:
        print(f"\nnf4tune / peft-bnb tokens/s: {by_side['nf4tune']['tokens_per_s'] / by_side['peft-bnb']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
