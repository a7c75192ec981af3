"""`nf4tune estimate --device cpu` against the measured peak of the same training step on CPU.

    python benchmarks/estimate_accuracy.py [--seq 32768] [--steps 2] [--config small] [--json]

A random Llama (the `--config` below) is written in bf16 to a temporary folder. A child process loads it with
LoRA r=16 on every linear layer of the blocks, gradient checkpointing on, bfloat16 compute, and runs `--steps`
training steps (nf4tune's chunked loss, backward, AdamW step) at batch 1 x `--seq` tokens. The child first runs
the same load and one 16-token step and drops them, so the code they import and one-time buffers are in place;
the measured figure is then its peak resident set (VmHWM, the high-water mark reset there with
/proc/self/clear_refs) minus its resident set at that point: what the model, the adapters, their gradients and
states and the step's activations add to the process. `estimate(..., device="cpu", optim="adamw_torch")` for
the same model and step is compared with it. tests/test_estimate_seq.py runs this at a short length (slow).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = {  # hidden, intermediate, layers, heads (head dim 64), vocabulary
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048, max_position_embeddings=65536),
    "wide": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=4096, max_position_embeddings=65536),
}
R = 16


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _train(folder: str, seq: int, steps: int) -> None:
    import torch

    import nf4tune
    from nf4tune.models.loss import loss_sum

    model, _ = nf4tune.load_model(folder, device="cpu", compute_dtype=torch.bfloat16, progress=False,
                                  lora=nf4tune.LoraConfig(r=R, alpha=R, dropout=0.0), gradient_checkpointing=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    for step in range(steps):
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(step))
        total, count = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        (total / count).backward()
        optimizer.step()  # the gradients stay until the next step's backward overwrites them, as in training


def child(folder: str, seq: int, steps: int) -> dict:
    """Train `steps` steps at 1 x `seq` and report the resident memory that run added to a process that had
    already run one short step (so the code it imports and its one-time buffers are not counted)."""
    import gc

    import torch

    torch.manual_seed(0)
    _train(folder, 16, 1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak from here on
    before = _status_bytes("VmRSS")
    _train(folder, seq, steps)
    return {"added_peak_bytes": _status_bytes("VmHWM") - before, "before_bytes": before}


def measure(config: dict, seq: int, steps: int = 2, mmap_threshold: int | None = None) -> dict:
    """Build the model of `config`, run the child, and set the estimate beside its measured peak. `mmap_threshold`
    (bytes) fixes glibc's: every larger block is its own mapping, given back when freed, where by default glibc
    raises the threshold as blocks are freed and keeps later ones in its heap (the resident set then holds
    freed tensors' pages too)."""
    import os

    from harness import build_random_llama

    from nf4tune.plan.estimate import estimate

    with tempfile.TemporaryDirectory() as tmp:
        build_random_llama(tmp, config)
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {})}
        out = subprocess.run([sys.executable, __file__, "--child", tmp, "--seq", str(seq), "--steps", str(steps)],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"the measured run failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate(tmp, seq_len=seq, r=R, optim="adamw_torch", device="cpu", compute_dtype="bfloat16")
    return {"seq": seq, "mmap_threshold": mmap_threshold, "measured_gib": measured["added_peak_bytes"] / 2**30,
            "estimate_gib": est.total / 2**30,
            "ratio": est.total / measured["added_peak_bytes"],
            "components_gib": {k: v / 2**30 for k, v in est.as_json().items()
                               if k in ("activations", "kept_outputs", "logits", "weights_4bit", "weights_16bit")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the measured run, in bytes (default: glibc's dynamic one)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.steps)))
        return
    result = measure(CONFIGS[args.config], args.seq, args.steps, args.mmap_threshold)
    if args.json:
        print(json.dumps(result))
        return
    print(f"# {args.config} Llama {CONFIGS[args.config]}, batch 1 x {args.seq}, LoRA r={R}, bf16, checkpointing, CPU, "
          f"glibc mmap threshold {args.mmap_threshold or 'dynamic'}")
    print(f"measured peak added: {result['measured_gib']:.3f} GiB; estimate: {result['estimate_gib']:.3f} GiB "
          f"(estimate / measured {result['ratio']:.3f})")
    print("estimate components (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in result["components_gib"].items()))


if __name__ == "__main__":
    main()
