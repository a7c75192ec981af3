"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint folder `checkpoint-<step>` holds the adapter in PEFT's format (usable on its own) and
`trainer_state.pt` with everything needed to continue so that the losses after the resume point are
those of an uninterrupted run. It is written to a temporary folder and renamed, so a run killed at
any moment leaves the previous checkpoint intact; the temporary folders such a kill leaves are
removed when the next run starts in the folder (`rundir.remove_unfinished`).

Checkpoints are shared and downloaded like adapters, so reading one must not run code: the state is
tensors, numbers, strings and containers only, read with `torch.load(weights_only=True)`, whose
unpickler builds nothing else (no allow-list beyond torch's own is needed). A file that would need
more is refused with a sentence, as is one that is not the dict nf4tune writes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from ..atomic import temp_dir
from ..errors import Nf4tuneError
from ..models.adapters import pairs_by_module, read_adapter, save_adapter
from ..outputs import OutOfSpace, folder_bytes, is_out_of_space

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
    needed = checkpoint_bytes(output_dir, model, trainer_state)  # before writing: a full disk then has less free
    try:
        if tmp is None:
            tmp = temp_dir(output_dir, prefix=f".checkpoint-{step}.")  # mkdir's permissions, not mkdtemp's 0700
        write_adapter(model, tmp)
        if getattr(model, "nf4tune_new_tokens_from", None) is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        summary = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, type(None)))}
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final
    except BaseException as e:
        if not (isinstance(e, Exception) and is_out_of_space(e, output_dir)):  # asked before the space is freed
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    # Out of space. Raised here, not in the except block: the failed write's exception must not stay
    # attached as the new one's context, since its frames hold torch's writer, and with it the open
    # (deleted) file whose space the disk needs back.
    shutil.rmtree(tmp, ignore_errors=True)
    raise OutOfSpace(final, needed, output_dir)


def checkpoint_bytes(output_dir: Path, model, trainer_state: dict) -> int:
    """About how many bytes a checkpoint takes: the newest one's size, or what is about to be written
    (the state's tensors and the trainable parameters, which the adapter holds)."""
    found = checkpoints(output_dir)
    if found:
        return folder_bytes(found[-1])
    return tensor_bytes(trainer_state) + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


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


def load_trainer_state(path: Path, lazily: bool = False) -> dict:
    """The checkpoint's training state, read without running code and checked to be what
    `save_checkpoint` writes. `lazily`: tensors mapped from the file rather than read (to check a
    checkpoint cheaply before the model loads)."""
    file = Path(path) / STATE_FILE
    state = read_state_file(file, lazily)
    check_trainer_state(state, file)
    return state


def read_state_file(file: Path, lazily: bool = False):
    """`torch.load(file, weights_only=True)`, its failures said in one sentence: a file that would
    need code run to load is refused, not loaded."""
    try:
        with warnings.catch_warnings():  # the weights-only unpickler's note on pickle protocols
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, weights_only=True, mmap=lazily and zipfile.is_zipfile(file))
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" ({found[1]})" if found else ""
            raise Nf4tuneError(
                f"{file} holds Python objects that only running code could load{what}; nf4tune reads only tensors and "
                "plain values from a checkpoint, so it does not load this one: resume from a checkpoint nf4tune wrote, "
                "or start again without --resume (the adapter beside it is safetensors and still usable).") from None
        first = (text.splitlines() or [type(e).__name__])[0] or type(e).__name__
        raise Nf4tuneError(f"{file} cannot be read ({first}); resume from an earlier checkpoint.") from e


# What `save_checkpoint` writes: key -> the types its value may have.
_STATE_KEYS = {
    "step": (int,), "tokens": (int,), "skipped_steps": (int,), "scheduler": (dict,), "data_position": (dict,),
    "rng": (dict,), "best_eval_loss": (float, int, type(None)), "best_checkpoint": (str, type(None)),
}


def check_trainer_state(state, file: Path) -> None:
    """Raise one sentence when `state` is not the dict `save_checkpoint` writes (a corrupt or foreign file)."""
    def refuse(problem: str):
        raise Nf4tuneError(f"{file} is not a training state nf4tune wrote ({problem}); resume from an earlier "
                           "checkpoint.")

    if not isinstance(state, dict):
        refuse(f"it holds {type(state).__name__}, not a dict")
    for key, types in _STATE_KEYS.items():
        if key not in state:
            refuse(f"{key!r} is missing")
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            refuse(f"{key!r} is {type(state[key]).__name__}")
    if not isinstance(state.get("optimizer"), (dict, type(None))):
        refuse(f"'optimizer' is {type(state['optimizer']).__name__}")
    position = state["data_position"]
    if not all(isinstance(position.get(k), int) for k in ("epoch", "index")):
        refuse("'data_position' lacks its epoch and index")
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("python"), tuple):
        refuse("'rng' lacks the torch and Python generator states")


def restore_adapter(model, path: Path) -> None:
    """Copy a checkpoint's adapter (and trained vocabulary rows) into the model's existing
    parameters, in place, so the optimizer's references stay valid."""
    config, pairs, saved = read_adapter(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in pairs_by_module(model, config, pairs, path).items():  # expert adapters included
            modules[name].lora_A.copy_(pair["A"])
            modules[name].lora_B.copy_(pair["B"])
        for name, rows in saved.items():
            rows.apply(modules[name].weight)
