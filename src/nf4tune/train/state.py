"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint folder `checkpoint-<step>` holds the adapter in PEFT's format (usable on its own) and
`trainer_state.pt` with everything needed to continue so that the losses after the resume point are
those of an uninterrupted run. It is written to a temporary folder and renamed, so a run killed at
any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from ..atomic import temp_dir
from ..errors import Nf4tuneError
from ..models.adapters import read_adapter, save_adapter

STATE_FILE = "trainer_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, trainer_state: dict,
                    write_adapter=save_adapter, tmp: Path | None = None) -> Path:
    """Write `checkpoint-<step>` atomically and return its path. `write_adapter(model, folder)`
    writes the adapter (a distributed run passes one that writes what the ranks gathered); `tmp`,
    the folder being filled, may already hold what other ranks wrote (their optimizer shards)."""
    final = output_dir / f"checkpoint-{step}"
    if tmp is None:
        tmp = temp_dir(output_dir, prefix=f".checkpoint-{step}.")  # mkdir's permissions, not mkdtemp's 0700
    try:
        write_adapter(model, tmp)
        if getattr(model, "nf4tune_new_tokens_from", None) is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        summary = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, type(None)))}
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = [(int(m[1]), p) for p in output_dir.glob("checkpoint-*")
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest `limit` checkpoints (and `keep`, the best one)."""
    if not limit:
        return
    found = checkpoints(output_dir)
    for path in found[: max(0, len(found) - limit)]:
        if keep is None or path.resolve() != keep.resolve():
            shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(output_dir: Path, resume: str | bool) -> Path:
    """`resume=True`: the latest checkpoint in output_dir; a path: that checkpoint."""
    if resume is True:
        found = checkpoints(output_dir)
        if not found:
            raise Nf4tuneError(f"--resume: {output_dir} has no checkpoint to resume from; start without --resume.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise Nf4tuneError(f"--resume {path}: not a training checkpoint (no {STATE_FILE}).")
    return path


def load_trainer_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE_FILE, weights_only=False)
    except Exception as e:
        raise Nf4tuneError(f"{path / STATE_FILE} cannot be read ({str(e).splitlines()[0]}); "
                           "resume from an earlier checkpoint.") from e


def restore_adapter(model, path: Path) -> None:
    """Copy a checkpoint's adapter (and trained vocabulary rows) into the model's existing
    parameters, in place, so the optimizer's references stay valid."""
    _, pairs, saved = read_adapter(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in pairs.items():
            modules[name].lora_A.copy_(pair["A"])
            modules[name].lora_B.copy_(pair["B"])
        for name, rows in saved.items():
            rows.apply(modules[name].weight)
