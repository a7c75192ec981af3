"""`nf4tune train RECIPE.yaml [key=value ...]`: QLoRA fine-tuning from a recipe."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ..errors import Nf4tuneError
from ..train.config import load_recipe, recipe_to_dict


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with QLoRA from a YAML recipe",
        description="Fine-tune a 4-bit model with LoRA adapters as a YAML recipe says. Overrides are key=value with "
        "dotted keys (training.learning_rate=1e-4). Checkpoints, metrics.jsonl, loss.png and the final adapter go "
        "to training.output_dir.",
    )
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. training.max_steps=100")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir, or from CHECKPOINT")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N processes on this machine through torchrun (one per GPU; gloo on CPU); "
                        "training.parallel picks DDP or FSDP")
    p.set_defaults(run=run)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line (one node) that runs this same training in `args.nproc` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "nf4tune", "train", args.recipe, *args.overrides]
    if args.resume is not None:
        command += ["--resume"] + ([] if args.resume is True else [str(args.resume)])
    return command + ([] if args.progress else ["--no-progress"])


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc is not None and not args.print_config:
        if args.nproc < 1:
            raise Nf4tuneError(f"--nproc must be at least 1, got {args.nproc}.")
        if "WORLD_SIZE" in os.environ:
            raise Nf4tuneError("--nproc starts torchrun itself; under torchrun, leave it out.")
        # torchrun stops every rank when one fails and exits non-zero; its status is ours.
        return subprocess.call(torchrun_command(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
        return 0
    from ..train.loop import train

    result = train(recipe, resume=args.resume, progress=args.progress)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports for all
        return 0
    minutes, seconds = divmod(int(result.seconds), 60)
    print(f"\ntrained {result.steps} steps in {minutes}m{seconds:02d}s on {result.tokens:,} tokens; "
          f"final loss {result.final_loss:.4f}")
    data = result.data
    if data is not None:
        print(f"  data: {data.used} examples from {data.source} ({data.format} format), {data.skipped} rows skipped, "
              f"{data.truncated} truncated")
    if result.skipped_steps:
        print(f"  {result.skipped_steps} step(s) skipped for NaN/Inf loss or gradients")
    if result.best_eval_loss is not None:
        print(f"  best eval loss {result.best_eval_loss:.4f} at {result.best_checkpoint}")
    if result.exact_match:
        em = result.exact_match
        if "before" in em:
            print(f"  exact match on held-out prompts: {em['before']:.1%} before -> {em['after']:.1%} after training")
        else:
            print(f"  exact match on held-out prompts: {em['after']:.1%}")
    print(f"  adapter: {result.adapter_dir}  (load with nf4tune.load_model(base, adapter=...) or peft)")
    print(f"  metrics: {result.output_dir / 'metrics.jsonl'}, plot: {result.output_dir / 'loss.png'}, "
          f"summary: {result.output_dir / 'summary.json'}")
    return 0
