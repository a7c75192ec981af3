"""`nf4tune estimate MODEL`: will this fine-tune fit on my GPU?"""

from __future__ import annotations

import argparse
import json

from ..registry import BASE_QUANT_TYPES, COMPUTE_DTYPES, ESTIMATE_DEVICES, OPTIMIZERS, PARALLEL_STRATEGIES
from .checks import count, number, resolve_builtin


def add_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="estimate the GPU memory of a QLoRA fine-tune from config.json",
        description="Estimate the GPU memory a QLoRA fine-tune of MODEL needs with nf4tune, reading only its "
        "config.json (a local folder, a config.json file, or a Hub id where the network allows).",
    )
    p.add_argument("model")
    p.add_argument("--seq-len", type=count(1), default=2048)
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--r", type=count(1), default=64, help="LoRA rank")
    p.add_argument("--target", default="all-linear", help="all-linear, or module names: q_proj,v_proj")
    p.add_argument("--optim", default="paged_adamw_32bit", choices=list(OPTIMIZERS))
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--gpus", type=count(1), default=1, help="GPUs training together (torchrun ranks)")
    p.add_argument("--strategy", choices=PARALLEL_STRATEGIES, default=None,
                   help="fsdp: weights, adapters and states sharded over the GPUs; ddp: replicated on each "
                        "(default: what training.parallel=auto picks)")
    p.add_argument("--gpu-gb", type=number(0, low_open=True), default=None,
                   help="memory per GPU in GB for the auto choice and --max-seq-len (default: 80)")
    p.add_argument("--max-seq-len", action="store_true",
                   help="answer the longest --seq-len (a multiple of 256) that fits --gpu-gb per GPU (with "
                        "--device cpu: per process), and its estimate")
    p.add_argument("--device", choices=ESTIMATE_DEVICES, default="cuda",
                   help="cpu: the memory of a CPU run, per process (no CUDA context; optimizer states stay in "
                        "host memory); nothing is run on any device either way")
    p.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default="bfloat16",
                   help="model.compute_dtype: what the embeddings, norms, output head and activations are held in")
    p.add_argument("--quant-type", choices=BASE_QUANT_TYPES, default="nf4",
                   help="quant.quant_type: a 4-bit type, or none (16-bit LoRA: the base in the compute dtype)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plan.estimate import estimate, format_table, pick_strategy

    model = resolve_builtin(args.model)
    plan = dict(seq_len=args.seq_len, batch=args.batch, r=args.r, target=args.target, optim=args.optim,
                checkpointing=args.checkpointing, device=args.device, compute_dtype=args.compute_dtype,
                quant_type=args.quant_type)
    auto, why = pick_strategy(model, (args.gpu_gb or 80) * 1e9, args.gpus, **plan) if args.gpus > 1 else ("ddp", "")
    strategy = args.strategy or auto
    if args.max_seq_len:
        return _max_seq_len(args, model, strategy, plan)
    est = estimate(model, gpus=args.gpus, strategy=strategy, **plan)
    if args.json:
        print(json.dumps({**est.as_json(), "strategy": strategy, "auto_strategy": auto, "auto_reason": why}, indent=2))
    else:
        print(format_table(est, _args_line(args, args.seq_len, strategy)))
        if args.gpus > 1:
            print(f"training.parallel=auto picks {auto.upper()} on {args.gpus} x {args.gpu_gb or 80:g} GB: {why}")
    return 0


def _args_line(args: argparse.Namespace, seq_len: int, strategy: str) -> str:
    return (f"{args.model}: seq {seq_len} x batch {args.batch}, LoRA r={args.r} on {args.target}, "
            f"{args.optim}, {args.quant_type}, {args.compute_dtype}, "
            f"checkpointing {'on' if args.checkpointing else 'off'}, "
            + (f"{args.gpus} GPU(s), {strategy.upper()}, per GPU" if args.device == "cuda"
               else f"CPU, {args.gpus} process(es), {strategy.upper()}, per process"))


def _max_seq_len(args: argparse.Namespace, model: str, strategy: str, plan: dict) -> int:
    """`--max-seq-len`: the longest sequence that fits, searched with the same model and options."""
    from ..plan.estimate import GIB, MAX_SEQ_STEP, format_table, max_seq_len, model_sizes, needed_bytes

    gb = args.gpu_gb or 80
    plan = {k: v for k, v in plan.items() if k != "seq_len"}
    seq, est = max_seq_len(model, gb * GIB, gpus=args.gpus, strategy=strategy, **plan)
    where = f"{gb:g} GB {'per GPU' if args.device == 'cuda' else 'per process'}"
    positions = model_sizes(model, args.target).max_positions if seq else None
    if args.json:
        print(json.dumps({"max_seq_len": seq, "budget_gb": gb, "step": MAX_SEQ_STEP, "max_position_embeddings": positions,
                          "strategy": strategy, "estimate": est.as_json() if est else None}, indent=2))
        return 0
    if not seq:
        print(f"{args.model}: not even {MAX_SEQ_STEP} tokens x batch {args.batch} fit {where}; the weights, adapters and "
              "states alone need more: try a smaller --r, --target, --optim or more --gpus.")
        return 0
    print(format_table(est, _args_line(args, seq, strategy)))
    print(f"longest sequence that fits {where}: {seq} tokens (estimate {needed_bytes(est) / GIB:.2f} GiB; "
          f"{seq + MAX_SEQ_STEP} would not fit)")
    if positions and seq > positions:
        print(f"note: the model's config has positions for {positions} tokens (max_position_embeddings); "
              "longer sequences need a RoPE scaling the model was trained or set up for.")
    return 0
