"""The output folder of a training run: never overwritten by accident, never mixed with another run.

- One run writes into a folder at a time: `claim_output_dir` takes its lock (`OUTPUT/nf4tune.lock`,
  naming the process and host; see runlock.py), so a second run into it is refused with a sentence
  naming the first, and removes what a killed run left half-written (`.NAME.*.partial`).
- A folder that holds a run is refused unless the new run resumes it (`--resume`) or the recipe
  says `training.overwrite_output_dir: true` (TrainingArguments' name), which moves the old run
  aside to `OUTPUT.old-<time>` rather than deleting it.
- Each run has an id, written to `OUTPUT/run.json` and into every checkpoint's trainer state, so
  `--resume` refuses a checkpoint of another run left in the folder.
- `--resume` checks that the recipe still builds the adapter the checkpoint holds (rank, target
  modules, base model, quantization) before anything loads.
- Facts of the run that a resumed process cannot recompute (the accuracy before training) live in
  `run.json` too.
- Ctrl-C: `TrainingInterrupted` carries what was saved, and `interrupted_message` says it with the
  exact command that continues.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import shutil
import time
import uuid
from pathlib import Path

from ..errors import Nf4tuneError

log = logging.getLogger("nf4tune")

RUN_FILE = "run.json"
LOCK_FILE = "nf4tune.lock"  # held while a run writes into the folder (runlock.py)
STATE_SUMMARY = "trainer_state.json"  # written by train/state.py beside trainer_state.pt
ADAPTER_CONFIG = "adapter_config.json"
# What a run leaves in its folder; any of these means the folder holds a run.
_RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "adapter", "loss.png", "recipe.json", RUN_FILE)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a run writes before its first step: a run that stopped during set-up (a bad recipe, a model that
# would not load) left nothing worth keeping, so its folder may be reused as it is.
_SET_UP_ONLY = {RUN_FILE, "recipe.json"}


# --- the output folder -------------------------------------------------------------------------

def run_contents(output_dir: str | Path) -> list[str]:
    """The names in `output_dir` that show it holds a run (checkpoints first), empty if none."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = sorted((p.name for p in out.iterdir() if _CHECKPOINT.match(p.name)),
                   key=lambda n: int(n.rsplit("-", 1)[1]))
    return names + [n for n in _RUN_OUTPUTS if (out / n).exists()]


def prepare_output_dir(output_dir: str | Path, resume: str | bool | None, overwrite: bool) -> Path | None:
    """Make `output_dir` ready for a run; returns where an old run was moved, if one was.

    A folder holding a run is refused unless `resume` is set (continue it) or `overwrite` is true
    (move it aside to `OUTPUT.old-<YYYYmmdd-HHMMSS>`). A run that stopped before its first step left only
    its set-up files, and its folder is reused. Calling it again on the prepared folder is a no-op.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise Nf4tuneError(f"training.output_dir {out} is a file; give a folder.")
    found = run_contents(out)
    if resume or set(found) <= _SET_UP_ONLY:
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise Nf4tuneError(f"{out} already holds a training run ({shown}); continue it with --resume, or start over "
                           "with training.overwrite_output_dir=true (the old run is moved to "
                           f"{out.name}.old-<time> beside it), or choose another training.output_dir.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
    out.rename(aside)
    out.mkdir(parents=True)
    return aside


def claim_output_dir(output_dir: str | Path, resume: str | bool | None, overwrite: bool):
    """Take `output_dir` for this run and make it ready: its lock (refused, naming the holder, while
    another run writes there; a lock left by a run that has ended is taken over), then
    `prepare_output_dir`, then the half-written files a killed run left are removed. Returns
    (the lock, where an old run was moved or None); release the lock when the run ends."""
    from .. import runlock

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise Nf4tuneError(f"training.output_dir {out} is a file; give a folder.")
    in_use, remedy = f"{out} is in use by another training run", "choose another training.output_dir"
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = runlock.acquire(out / LOCK_FILE, in_use, remedy)
    except OSError as e:
        raise Nf4tuneError(f"training.output_dir {out} cannot be written ({e.strerror or e}); choose a folder you "
                           "can write to.") from e
    try:
        aside = prepare_output_dir(out, resume, overwrite)
        if aside is not None:  # this process's lock file moved with the old run: lock the new folder
            lock = lock.relocate(aside / LOCK_FILE, out / LOCK_FILE, in_use, remedy)
        remove_unfinished(out)
    except BaseException:
        lock.release()
        raise
    return lock, aside


def remove_unfinished(output_dir: str | Path) -> list[str]:
    """Remove the temporary files and folders (`.NAME.*.partial`: an unfinished checkpoint, adapter or
    run.json) that a run killed while writing left in `output_dir`, and return their names. Only
    while holding the folder's lock: a live run's temporary folder must not be taken from under it."""
    removed = []
    for path in sorted(Path(output_dir).glob(".*.partial")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("nf4tune: removed what an interrupted run left half-written in %s: %s", output_dir, ", ".join(removed))
    return removed


# --- run identity ------------------------------------------------------------------------------

def read_run_info(output_dir: str | Path) -> dict:
    """`OUTPUT/run.json` as a dict (empty if absent or unreadable)."""
    try:
        info = json.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def update_run_info(output_dir: str | Path, **fields) -> dict:
    """Merge `fields` into `OUTPUT/run.json` (written atomically) and return the result."""
    from ..atomic import atomic_write_text

    info = {**read_run_info(output_dir), **fields}
    atomic_write_text(Path(output_dir) / RUN_FILE, json.dumps(info, indent=2) + "\n")
    return info


def start_run(output_dir: str | Path, resume_from: Path | None = None) -> str:
    """The run id of this run: the resumed checkpoint's (or the folder's), else a new one, recorded in run.json."""
    if resume_from is not None:
        run_id = checkpoint_run_id(resume_from) or read_run_info(output_dir).get("run_id")
        if run_id:
            if read_run_info(output_dir).get("run_id") != run_id:
                update_run_info(output_dir, run_id=run_id)
            return run_id
    run_id = uuid.uuid4().hex[:12]
    update_run_info(output_dir, run_id=run_id, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    return run_id


def checkpoint_run_id(checkpoint: str | Path) -> str | None:
    """The run id a checkpoint was saved with (None for checkpoints from before run ids)."""
    try:
        state = json.loads((Path(checkpoint) / STATE_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get("run_id") if isinstance(state, dict) else None


def check_checkpoint_run(output_dir: str | Path, checkpoint: str | Path) -> None:
    """Refuse to resume from a checkpoint that another run left in `output_dir`."""
    folder_id = read_run_info(output_dir).get("run_id")
    ckpt_id = checkpoint_run_id(checkpoint)
    checkpoint = Path(checkpoint)
    if folder_id and ckpt_id and folder_id != ckpt_id and checkpoint.resolve().parent == Path(output_dir).resolve():
        raise Nf4tuneError(f"--resume: {checkpoint} belongs to an earlier run (run id {ckpt_id}) than the one in "
                           f"{output_dir} (run id {folder_id}); resuming would mix the two. Give that checkpoint's "
                           "path explicitly only if you mean it, or start a new run.")


def latest_checkpoint_of_run(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir` saved by the run recorded in run.json (any
    checkpoint when the folder or the checkpoints predate run ids)."""
    out = Path(output_dir)
    run_id = read_run_info(out).get("run_id")
    found = sorted(((int(m[1]), p) for p in out.glob("checkpoint-*")
                    if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.pt").is_file()))
    for _, path in reversed(found):
        ckpt_id = checkpoint_run_id(path)
        if run_id is None or ckpt_id is None or ckpt_id == run_id:
            return path
    return None


# --- does the recipe still fit the checkpoint? -------------------------------------------------

def _flat(recipe_dict: dict) -> dict:
    return {f"{section}.{key}": value for section, values in recipe_dict.items() if isinstance(values, dict)
            for key, value in values.items()}


# Settings that decide the adapter's shape or the function it was trained against: a resumed run
# must keep them.
_MUST_MATCH = ("model.name_or_path", "model.add_tokens", "model.add_special_tokens", "quant.quant_type",
               "quant.double_quant", "quant.blocksize", "lora.r", "lora.alpha", "lora.target_modules",
               "lora.use_rslora")


def check_resume_fits(checkpoint: str | Path, recipe_dict: dict, saved_recipe: dict | None = None) -> None:
    """Raise one sentence when the recipe (as `recipe_to_dict` gives it) would not rebuild the adapter in
    `checkpoint`: its rank from adapter_config.json, the rest from the run's saved recipe.json."""
    checkpoint = Path(checkpoint)
    now = _flat(recipe_dict)
    differences = []
    try:
        adapter = json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        adapter = {}
    if isinstance(adapter.get("r"), int) and now.get("lora.r") != adapter["r"]:
        differences.append(("lora.r", adapter["r"], now.get("lora.r")))
    if saved_recipe is None:
        saved_recipe = {}
        for folder in (checkpoint, checkpoint.parent):
            try:
                saved_recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
                break
            except (OSError, ValueError):
                continue
    before = _flat(saved_recipe)
    for key in _MUST_MATCH:
        if key in before and key in now and before[key] != now[key] and key not in (d[0] for d in differences):
            differences.append((key, before[key], now[key]))
    if differences:
        then = ", ".join(f"{k}={v}" for k, v, _ in differences)
        said = ", ".join(f"{k}={v}" for k, _, v in differences)
        raise Nf4tuneError(f"--resume: {checkpoint} was trained with {then} but the recipe now says {said}; "
                           f"resume with {then}, or start a new run without --resume.")


# --- seeding -----------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (every device). Call after everything that may build or
    download a model (a first-use build must not change what the run draws) and before the adapters
    are initialized."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


# --- Ctrl-C ------------------------------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what is on disk: `checkpoint` (None if nothing) at `step`."""

    def __init__(self, output_dir: Path, step: int | None, checkpoint: Path | None, saved_now: bool = False):
        super().__init__(f"stopped at step {step}")
        self.output_dir, self.step, self.checkpoint, self.saved_now = Path(output_dir), step, checkpoint, saved_now


def should_save_on_interrupt(output_dir: str | Path, step: int) -> bool:
    """Whether Ctrl-C at `step` (completed steps) should write a checkpoint: progress was made since
    the newest checkpoint of this run (or there is none yet)."""
    if step <= 0:
        return False
    latest = latest_checkpoint_of_run(output_dir)
    return latest is None or int(latest.name.rsplit("-", 1)[1]) < step


def resume_command(recipe_path: str, overrides: list[str], program: str = "nf4tune") -> str:
    """The shell command that continues the run (quoted for a POSIX shell)."""
    kept = [o for o in overrides if not o.startswith("training.overwrite_output_dir")]
    return shlex.join([program, "train", str(recipe_path), *kept, "--resume"])


def interrupted_message(stop: TrainingInterrupted, recipe_path: str, overrides: list[str]) -> str:
    """What the CLI prints when training was interrupted: what is saved and how to continue."""
    at = f" at step {stop.step}" if stop.step is not None else ""
    if stop.checkpoint is None:
        again = [o for o in overrides if not o.startswith("training.overwrite_output_dir")]
        return (f"training interrupted{at}; no checkpoint was saved, so nothing can be resumed: start again with "
                f"{shlex.join(['nf4tune', 'train', str(recipe_path), *again, 'training.overwrite_output_dir=true'])}")
    name = Path(stop.checkpoint).name
    ckpt_step = int(name.rsplit("-", 1)[1]) if _CHECKPOINT.match(name) else stop.step
    how = "saved on interrupt" if stop.saved_now else "the last one saved"
    return (f"training interrupted{at}; {stop.checkpoint} ({how}, step {ckpt_step}) holds the progress. "
            f"Continue with: {resume_command(recipe_path, overrides)}")


def interruption_on_disk(output_dir: str | Path) -> TrainingInterrupted:
    """What a Ctrl-C left when the loop did not say (the newest checkpoint of the run, if any)."""
    return TrainingInterrupted(Path(output_dir), None, latest_checkpoint_of_run(output_dir))
