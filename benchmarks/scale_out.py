"""Scale-out: tokens/s and memory per rank of `nf4tune train` on 1 and 2 processes (torchrun, gloo on CPU).

    python benchmarks/scale_out.py [--steps 12] [--threads 1] [--hidden 512] [--layers 4] [--device cpu|cuda]

A random bf16 Llama (hidden 512, 4 layers, intermediate 1408, the character tokenizer) in NF4 with
double quantization, LoRA r=16 on all linear layers, float32 compute, per-device batch 4 of the
parity rows. One process with accumulation 2 and two processes with accumulation 1 train the same
global batch of 8 (weak scaling by ranks: each rank does half the work per step); 1 thread per rank
(OMP_NUM_THREADS). tokens/s is the global figure rank 0 logs, averaged over the steps after the first
two; memory is the largest peak resident set of any rank (`peak_memory_gib`, ru_maxrss), and
`param_bytes_per_rank` the parameters and buffers a rank holds (summary.json). Scaling efficiency is
tokens/s(N) / (N x tokens/s(1)) where the one process runs the same global batch, so a perfect
2-rank run takes half the time per step.

`--compare-hf` adds transformers `Trainer` + peft LoRA + bitsandbytes 4-bit (NF4, double quant,
`bnb_4bit_quant_storage=float32`, as FSDP recipes set it) on the same model, data, batch and ranks.
On CPU accelerate cannot shard it: accelerate 1.15 turns FSDP on only for accelerator devices
(`AcceleratorState`: MULTI_GPU, MULTI_XPU, ...), and a CPU run is MULTI_CPU, which `Trainer` wraps in
DDP; so on CPU that row is DDP, to be read against nf4tune's DDP row. `--quick`: a smoke run (hidden
128, 2 layers, 4 steps).

`--device cuda`: the same runs on GPUs, one rank per GPU over NCCL, computing in bfloat16 (QLoRA's
compute dtype on GPUs); memory per rank is then the peak of `torch.cuda.max_memory_allocated` over the
ranks (summary.json's `peak_memory_gib` on CUDA). It needs at least 2 GPUs and says so and stops
without them; `--compare-hf` is CPU-only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(root: Path, model: Path, steps: int, device: str = "cpu", batch: int = 4) -> dict:
    on_gpu = {"device": "cuda", "compute_dtype": "bfloat16"} if device == "cuda" else {}
    return {
        "model": {"name_or_path": str(model), "compute_dtype": "float32", **on_gpu},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(ROOT / "recipes" / "data" / "parity_train.jsonl"), "source_max_len": 32,
                 "target_max_len": 8},
        "training": {"output_dir": str(root / "out"), "max_steps": steps, "per_device_train_batch_size": batch,
                     "gradient_accumulation_steps": 2, "logging_steps": 1, "save_steps": 10_000, "seed": 0,
                     "optim": "paged_adamw_32bit"},
    }


def run(root: Path, recipe: Path, nproc: int, strategy: str, threads: int, device: str = "cpu") -> dict:
    out = root / f"n{nproc}-{strategy}"
    overrides = [f"training.output_dir={out}"]
    if nproc > 1:
        overrides += ["training.gradient_accumulation_steps=1", f"training.parallel={strategy}"]
    command = [sys.executable, "-m", "nf4tune", "train", str(recipe), *overrides, "--no-progress"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{strategy} on {nproc} {device} rank(s) failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][2:]
    summary = json.loads((out / "summary.json").read_text())
    # CUDA: max_memory_allocated, the largest over the ranks; CPU: the peak resident set of the training steps
    memory = summary["peak_memory_gib"] if device == "cuda" else max(r["peak_memory_gib"] for r in rows)
    return {"nproc": nproc, "strategy": strategy if nproc > 1 else "single",
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows),
            "memory_gib_per_rank": memory,
            "param_bytes_per_rank": summary["param_bytes_per_rank"], "final_loss": summary["final_loss"]}


HF_CHILD = """
import json, os, sys, time
from pathlib import Path
import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

model_path, data_path, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, sys.argv[5])  # benchmarks/
from harness import load_peft_bnb
from nf4tune.models.checkpointing import training_arguments  # transformers' name for it, old or new
tokenizer = AutoTokenizer.from_pretrained(model_path)
rows = [json.loads(line) for line in open(data_path)]
examples = [tokenizer(r["prompt"] + r["completion"], truncation=True, max_length=40)["input_ids"] for r in rows]
examples = [{"input_ids": ids, "labels": ids} for ids in examples]
model = load_peft_bnb(model_path, {"": "cpu"}, dropout=0.0, compute=torch.float32, storage=torch.float32)
pad = tokenizer.pad_token_id

def collate(batch):
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.tensor([b["input_ids"] + [pad] * (n - len(b["input_ids"])) for b in batch])
    labels = torch.tensor([b["labels"] + [-100] * (n - len(b["labels"])) for b in batch])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.rss = [], []
    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.time())
        with open("/proc/self/statm") as f:
            self.rss.append(int(f.read().split()[1]) * 4096)

clock = Clock()
args = TrainingArguments(output_dir=str(out / "hf"), max_steps=steps, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, ddp_backend="gloo", optim="adamw_torch", seed=0,
                         dataloader_num_workers=0, disable_tqdm=True, **training_arguments())
trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[clock])
trainer.train()
world = int(os.environ.get("WORLD_SIZE", "1"))
per_step = sum(len(e["input_ids"]) for e in examples) / len(examples) * 4 * world
gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
result = {"tokens_per_s": per_step / (sum(gaps) / len(gaps)), "memory_gib": max(clock.rss) / 2**30,
          "strategy": trainer.accelerator.distributed_type.value}
(out / f"hf-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
"""


def run_hf(root: Path, model: Path, nproc: int, steps: int, threads: int) -> dict:
    """transformers Trainer + peft + bitsandbytes on `nproc` CPU ranks (torchrun, gloo)."""
    script = root / "hf_child.py"
    script.write_text(HF_CHILD)
    out = root / f"hf-{nproc}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
               str(model), str(ROOT / "recipes" / "data" / "parity_train.jsonl"), str(out), str(steps),
               str(ROOT / "benchmarks")]
    subprocess.run(command, check=True, env=env, capture_output=True)
    ranks = [json.loads((out / f"hf-rank{r}.json").read_text()) for r in range(nproc)]
    kind = "single" if nproc == 1 else {"MULTI_CPU": "DDP"}.get(ranks[0]["strategy"], ranks[0]["strategy"])
    return {"nproc": nproc, "strategy": f"HF {kind}", "tokens_per_s": ranks[0]["tokens_per_s"],
            "memory_gib_per_rank": max(r["memory_gib"] for r in ranks), "param_bytes_per_rank": float("nan"),
            "final_loss": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compare-hf", action="store_true",
                        help="add transformers Trainer + peft + bitsandbytes on the same model and ranks")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (examples per rank per micro-batch)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo, one thread per rank; cuda: NCCL, one rank per GPU (needs 2 GPUs)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: hidden 128, 2 layers, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps = 128, 2, 4
    if args.device == "cuda":
        if args.compare_hf:
            sys.exit("scale_out: --compare-hf runs transformers Trainer on CPU only; leave it out with --device cuda.")
        gpus = _cuda_gpus()
        if gpus < 2:
            print(f"scale_out: skipped: --device cuda needs at least 2 CUDA GPUs (one rank per GPU, NCCL); "
                  f"this machine has {gpus}.")
            return
    import yaml

    from nf4tune.checkpoint.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_checkpoint(root / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_shard_size="50MB")
        (root / "recipe.yaml").write_text(yaml.safe_dump(_recipe(root, model, args.steps, args.device, args.batch)))
        results = [run(root, root / "recipe.yaml", 1, "single", args.threads, args.device)]
        for strategy in ("ddp", "fsdp"):
            results.append(run(root, root / "recipe.yaml", 2, strategy, args.threads, args.device))
        if args.compare_hf:
            results += [run_hf(root, model, n, args.steps, args.threads) for n in (1, 2)]
    one = results[0]["tokens_per_s"]
    hf_one = next((r["tokens_per_s"] for r in results if r["strategy"].startswith("HF") and r["nproc"] == 1), one)
    memory = "alloc/rank" if args.device == "cuda" else "RSS/rank"  # max_memory_allocated, or the peak resident set
    print(f"{args.device}: hidden {args.hidden}, {args.layers} layers, {args.steps} steps, per-device batch {args.batch}")
    print(f"{'ranks':>5} {'strategy':>10} {'tokens/s':>10} {'efficiency':>10} {memory:>10} {'params/rank':>12} {'loss':>8}")
    for r in results:
        base = hf_one if r["strategy"].startswith("HF") else one  # each against its own one process
        efficiency = r["tokens_per_s"] / (r["nproc"] * base)
        print(f"{r['nproc']:>5} {r['strategy']:>10} {r['tokens_per_s']:>10.0f} {efficiency:>10.0%} "
              f"{r['memory_gib_per_rank']:>8.2f} G {r['param_bytes_per_rank'] / 2**20:>9.2f} MiB {r['final_loss']:>8.4f}")


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


if __name__ == "__main__":
    main()
