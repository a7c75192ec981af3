"""End-to-end QLoRA fine-tuning throughput: `nf4tune train` vs a transformers Trainer + peft + bitsandbytes script.

    python benchmarks/train_e2e.py [--steps 8] [--rounds 3] [--device cpu]

Same model (random bf16 Llama: hidden 1024, 8 layers, 16 heads, intermediate 2816, a 32,000-word
tokenizer), same data (600 synthetic Alpaca rows, tokenized the same way: the prompt masked, the
response trained), same batch (4), LoRA (r=16, alpha=16, dropout 0.05, all linear layers), AdamW at
lr 2e-4, gradient checkpointing, bf16. The peer is the QLoRA recipe as users run it: Trainer with
`bf16=True`, `prepare_model_for_kbit_training`, `get_peft_model`. Each side runs in its own
process; tokens/s counts the non-padding tokens of the steps after the first, and peak RSS is the
whole process's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import build_random_llama, load_peft_bnb, peak_rss_bytes  # noqa: E402
from harness import run_side as run_child
from train_step import CONFIG  # noqa: E402

WORDS = "the a model learns to answer questions about numbers words and colors quickly with care".split()


def build(root: Path) -> None:
    """The model (random bf16 weights) and a 32,000-word tokenizer, so the output head costs what it
    does in real models; the data are sentences over those words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    template = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    words = specials + sorted(set(WORDS + template.split() + ["###", "Instruction:", "Response:"]))
    words += [f"w{i}" for i in range(CONFIG["vocab_size"] - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    build_random_llama(root / "model", {**CONFIG, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    fast.save_pretrained(root / "model")
    rng = random.Random(0)
    vocab = words[len(specials):]
    rows = [{"instruction": " ".join(rng.choices(vocab, k=rng.randint(8, 30))), "input": "",
             "output": " ".join(rng.choices(vocab, k=rng.randint(10, 60)))} for _ in range(600)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_nf4tune(root: Path, args) -> dict:
    from nf4tune.train.config import recipe_from_dict
    from nf4tune.train.loop import train

    recipe = recipe_from_dict({
        "model": {"name_or_path": str(root / "model"), "device": args.device},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05},
        "data": {"path": str(root / "data.jsonl"), "source_max_len": 256, "target_max_len": 256},
        "training": {"output_dir": str(root / "nf4tune-out"), "max_steps": args.steps, "per_device_train_batch_size": 4,
                     "learning_rate": 2e-4, "logging_steps": 1, "save_steps": 10**6, "seed": 0},
    })
    train(recipe, progress=False)
    records = [json.loads(line) for line in (root / "nf4tune-out" / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r)}


def run_peer(root: Path, args) -> dict:
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from nf4tune.train.data import collate, load_examples

    tok = AutoTokenizer.from_pretrained(root / "model")
    examples, _ = load_examples(str(root / "data.jsonl"), "train", "auto", tok, 256, 256, False)
    model = load_peft_bnb(root / "model", args.device)
    seen = {"tokens": []}

    def collator(rows):
        batch = collate(rows, tok.pad_token_id)
        seen["tokens"].append(int(batch["attention_mask"].sum()))
        return batch

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    targs = TrainingArguments(output_dir=str(root / "peer-out"), max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=2e-4, lr_scheduler_type="constant", bf16=True, logging_steps=1,
                              save_strategy="no", report_to=[], remove_unused_columns=False, seed=0,
                              use_cpu=args.device == "cpu", dataloader_num_workers=0)
    timer = Timer()
    Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator, callbacks=[timer]).train()
    rates = [n / t for n, t in zip(seen["tokens"][1:], timer.times[1:])]
    return {"tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="runs of both sides, interleaved (the machine drifts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_nf4tune if args.side == "nf4tune" else run_peer)(Path(args.root), args)
        result["peak_rss_gib"] = peak_rss_bytes() / 2**30
        print(json.dumps(result))
        return
    sides = ("nf4tune", "transformers+peft+bnb")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        for _ in range(args.rounds):
            rounds.append({side: run_child(__file__, side, "--root", tmp, "--steps", str(args.steps), "--device", args.device)
                           for side in sides})
    print(f"# {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} steps of batch 4, "
          f"{args.rounds} interleaved rounds")
    print("| side | tokens/s per round | median tokens/s | peak RSS GiB |")
    print("|---|---|---|---|")
    for side in sides:
        rates = [r[side]["tokens_per_s"] for r in rounds]
        print(f"| {side} | {', '.join(f'{x:.0f}' for x in rates)} | {statistics.median(rates):.0f} | "
              f"{max(r[side]['peak_rss_gib'] for r in rounds):.2f} |")
    ratios = [r["nf4tune"]["tokens_per_s"] / r["transformers+peft+bnb"]["tokens_per_s"] for r in rounds]
    print(f"\nnf4tune / peer tokens/s per round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
