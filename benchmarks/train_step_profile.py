"""Where one QLoRA training step goes: nf4tune's step through `model(input_ids=..., labels=...)`, backward
and an AdamW step, profiled with torch.profiler, its time split into the parts of a decoder step.

    python benchmarks/train_step_profile.py MODEL_DIR [--batch 4] [--seq 384] [--threads 1] [--steps 2]

MODEL_DIR is a bf16 checkpoint (e.g. one `train_step.py`'s shape flags build). The parts are labelled by
wrapping, in this process only, the functions that do them in `torch.profiler.record_function`: the
4-bit dequantize, the 4-bit layer's forward and backward (matmul + LoRA), transformers' RMSNorm, rotary
and attention, the loss, the optimizer. A label's time includes what runs inside it (the 4-bit
layer's includes its dequantize); "self" columns say what is left once the labelled parts inside are
taken out. Run it with one thread on a loaded machine: CPU time is then what the step costs.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument() -> None:
    """Wrap the step's parts in record_function labels (module attributes looked up at call time)."""
    import transformers.models.llama.modeling_llama as llama
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from nf4tune import dispatch
    from nf4tune.layers import dropout, linear4bit
    from nf4tune.models import loss, peft_compat

    dispatch.dequantize_scratch = labelled("4bit dequantize", dispatch.dequantize_scratch)
    fn = linear4bit._Lora4bitMatmul
    fn.forward = staticmethod(labelled("4bit+LoRA layer forward", fn.forward))
    fn.backward = staticmethod(labelled("4bit+LoRA layer backward", fn.backward))
    dropout.LoraDropout.forward = labelled("LoRA dropout", dropout.LoraDropout.forward)
    llama.LlamaRMSNorm.forward = labelled("RMSNorm", llama.LlamaRMSNorm.forward)
    llama.apply_rotary_pos_emb = labelled("rotary", llama.apply_rotary_pos_emb)
    llama.LlamaMLP.forward = labelled("MLP (incl. its 4-bit layers)", llama.LlamaMLP.forward)
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        ALL_ATTENTION_FUNCTIONS[name] = labelled("attention", ALL_ATTENTION_FUNCTIONS[name])
    llama.eager_attention_forward = labelled("attention", llama.eager_attention_forward)
    peft_compat.chunked_loss_sum = labelled("loss (chunked, fwd+grad)", loss.chunked_loss_sum)
    torch.optim.AdamW.step = labelled("optimizer", torch.optim.AdamW.step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    instrument()
    import nf4tune

    model, _ = nf4tune.load_model(Path(args.model), device="cpu", progress=False,
                                  lora=nf4tune.LoraConfig(r=16, alpha=16, dropout=0.05))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        with record_function("forward (model(..., labels=))"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function("backward"):
            loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: compilation, allocator
    cpu = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            start = time.process_time()
            step()
            cpu.append(time.process_time() - start)
    print(f"# CPU s per step: {', '.join(f'{c:.2f}' for c in cpu)} ({args.threads} thread(s), batch {args.batch} x {args.seq})")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
