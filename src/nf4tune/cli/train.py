"""`nf4tune train RECIPE.yaml [key=value ...]`: QLoRA fine-tuning from a recipe."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import Nf4tuneError
from .checks import count

PATH_RULE = ("relative paths: data.path and eval.path are read from the current folder, else from the recipe's "
             "folder; training.output_dir is relative to the current folder")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with QLoRA from a YAML recipe",
        description="Fine-tune a 4-bit model with LoRA adapters as a YAML recipe says. Overrides are key=value with "
        "dotted keys (training.learning_rate=1e-4), anywhere after the recipe; a later one wins. Checkpoints, "
        "metrics.jsonl, loss.png and the final adapter go to training.output_dir; a folder holding a run is continued "
        "with --resume or replaced with "
        f"training.overwrite_output_dir=true (the old run is moved aside). {PATH_RULE[0].upper() + PATH_RULE[1:]}.",
    )
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. training.max_steps=100")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run in output_dir, or from CHECKPOINT (a path; "
                        "a key=value word after --resume that is no existing path is an override)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--nproc", type=count(1), default=None, metavar="N",
                   help="start N processes on this machine through torchrun (one per GPU; gloo on CPU); "
                        "training.parallel picks DDP or FSDP")
    p.set_defaults(run=run)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print_config(recipe) -> None:
    import yaml

    from ..train.config import recipe_to_dict

    print(f"# {PATH_RULE}; resolved:")
    print(f"#   data.path: {Path(recipe.data.path).resolve() if Path(recipe.data.path).exists() else recipe.data.path}")
    if recipe.eval.path:
        print(f"#   eval.path: {Path(recipe.eval.path).resolve() if Path(recipe.eval.path).exists() else recipe.eval.path}")
    print(f"#   training.output_dir: {Path(recipe.training.output_dir).resolve()}")
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")


def _check_before_loading(recipe, resume):
    """What can be refused before the tokenizer, the data or the model load. Returns the output
    folder's lock (taken here so that no other run starts into the folder meanwhile); release it
    when the run ends."""
    from ..train import rundir
    from .checks import check_data_file, check_model_location

    check_model_location(recipe.model.name_or_path, "model.name_or_path")
    check_data_file(recipe.data.path, "data.path")
    if recipe.eval.path:
        check_data_file(recipe.eval.path, "eval.path")
    out = Path(recipe.training.output_dir)
    lock, aside = rundir.claim_output_dir(out, resume, recipe.training.overwrite_output_dir)
    try:
        if aside is not None:
            print(f"nf4tune: the previous run in {out} was moved to {aside}", file=sys.stderr)
        if resume:
            _check_resume(recipe, resume, out)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_resume(recipe, resume, out: Path) -> None:
    """The checkpoint to resume from belongs to this run, fits the recipe, and holds a training state
    that loads without running code (read lazily: the tensors are not read yet)."""
    from ..train import rundir
    from ..train.config import recipe_to_dict
    from ..train.state import STATE_FILE, load_trainer_state

    if resume is True:
        checkpoint = rundir.latest_checkpoint_of_run(out)
        if checkpoint is None:
            return  # the loop says there is nothing to resume from
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            return  # the loop names what is missing
    rundir.check_checkpoint_run(out, checkpoint)
    rundir.check_resume_fits(checkpoint, recipe_to_dict(recipe))
    if (checkpoint / STATE_FILE).is_file():
        load_trainer_state(checkpoint, lazily=True)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line (one node) that runs this same training in `args.nproc` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "nf4tune", "train", args.recipe, *args.overrides]
    if args.resume is not None:
        command += ["--resume"] + ([] if args.resume is True else [str(args.resume)])
    return command + ([] if args.progress else ["--no-progress"])


def run(args: argparse.Namespace) -> int:
    from ..train.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc is not None and not args.print_config:
        if "WORLD_SIZE" in os.environ:
            raise Nf4tuneError("--nproc starts torchrun itself; under torchrun, leave it out.")
        # torchrun stops every rank when one fails and exits non-zero; its status is ours.
        return subprocess.call(torchrun_command(args))
    if args.print_config:
        _print_config(recipe)
        return 0
    from ..train import rundir
    from ..train.loop import train
    from ..train.parallel import resume_after_restart

    recipe, resume = resume_after_restart(recipe, args.resume)  # torchrun restarted the ranks: continue
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one rank prepares the folder (the loop's other ranks wait for it)
        lock = _check_before_loading(recipe, resume)
    try:
        result = train(recipe, resume=resume, progress=args.progress)
    except KeyboardInterrupt as stop:
        if not isinstance(stop, rundir.TrainingInterrupted):
            stop = rundir.interruption_on_disk(recipe.training.output_dir)
        print("\n" + rundir.interrupted_message(stop, args.recipe, args.overrides), file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports for all
        return 0
    minutes, seconds = divmod(int(result.seconds), 60)
    print(f"\ntrained {result.steps} steps in {minutes}m{seconds:02d}s on {result.tokens:,} tokens; "
          f"final loss {result.final_loss:.4f}")
    data = result.data
    if data is not None:
        print(f"  data: {data.used} examples from {data.source} ({data.format} format), "
              f"{_plural(data.skipped, 'row')} skipped, {data.truncated} truncated")
    if result.peak_memory:
        print(f"  peak memory {result.peak_memory['peak_memory_gib']:.2f} GiB "
              f"({result.peak_memory['peak_memory_measure']})")
    if result.skipped_steps:
        print(f"  {_plural(result.skipped_steps, 'step')} skipped for NaN/Inf loss or gradients")
    if result.best_eval_loss is not None:
        print(f"  best eval loss {result.best_eval_loss:.4f} at {result.best_checkpoint}")
    after = result.benchmarks.get("after", {}) if result.benchmarks else {}
    for key, value in after.items():
        before = result.benchmarks.get("before", {}).get(key)
        print(f"  {key}: " + (f"{before:.4f} before -> " if before is not None else "") + f"{value:.4f} after training")
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
