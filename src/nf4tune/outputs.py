"""What every command that writes checks first, and how a full disk is reported.

- No command writes onto one of its own inputs (`nf4tune export X.gguf X.gguf` would replace the
  model it reads), nor into a folder that holds one (replacing the folder would delete the input).
- An existing output is replaced only when the user says so (`--overwrite`); the writers then build
  the new output under a temporary name and rename it into place when it is complete, so the old
  one stays whole until then (see atomic.py).
- "No space left on device" is said as such, with how much to free, whatever library was writing
  (torch's zip writer says `unexpected pos ...`, safetensors `os error 28`).

Nothing here imports torch.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import Nf4tuneError


def _local(path: str | Path | None) -> Path | None:
    """`path` as an absolute, resolved local path, or None when it names nothing here (a Hub id)."""
    if path is None or str(path).startswith(("tiny-random:", "pip:")):
        return None
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)  # samefile: a hard link is the same file too
    except OSError:
        return False


def check_output(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]], overwrite: bool,
                 flag: str = "--overwrite") -> Path:
    """Refuse (one sentence) an output `out` that is one of `inputs` ((what, path) pairs, e.g.
    ("the base model", "m.gguf")) or a folder holding one, and an existing `out` (a file, or a folder
    with anything in it) unless `overwrite`. Returns `out` as a Path."""
    out = Path(out)
    target = out.expanduser().resolve()
    for what, given in inputs:
        source = _local(given)
        if source is None:
            continue
        if _same(target, source):
            raise Nf4tuneError(f"{out} is {what} itself ({given}); writing there would destroy what is being read: "
                               "give another output path.")
        if source.is_relative_to(target):
            raise Nf4tuneError(f"{out} holds {what} ({given}); replacing it would delete what is being read: "
                               "give another output path.")
    if exists(out) and not overwrite:
        kind = "folder" if out.is_dir() else "file"
        raise Nf4tuneError(f"{out} already exists; pass {flag} to replace that {kind} (it is replaced only once the "
                           "new one is complete), or give another output path.")
    return out


def check_export_outputs(out: str | Path, base: str, adapter: str | None, ollama: bool, overwrite: bool) -> None:
    """`nf4tune export`'s outputs (the .gguf file, and the Modelfile beside it with `ollama`) checked
    by `check_output` against its inputs (the base model, the adapter)."""
    inputs = [("the base model", base), ("the adapter", adapter)]
    check_output(out, inputs, overwrite)
    if ollama:
        check_output(Path(out).with_name("Modelfile"), inputs, overwrite)


def exists(path: str | Path) -> bool:
    """Whether writing `path` would replace something: a file, a link, or a folder with anything in it
    (an empty folder the user made for the output replaces nothing)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


# --- out of space -------------------------------------------------------------------------------

# What the writers say when a write finds the disk full: torch's zip writer (`unexpected pos` with
# `basic_ios::clear` as its cause), safetensors (`os error 28`), Python (`[Errno 28]`), numpy's tofile.
_FULL_DISK_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "StorageFull")
_WRITE_FAILED_WORDS = ("unexpected pos", "basic_ios::clear", "file write failed", "PytorchStreamWriter failed",
                       "requested and")  # numpy's tofile (the gguf writer): "N requested and M written"
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this free failed for the space


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free to this user on the filesystem holding `folder` (its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_out_of_space(error: BaseException, folder: str | Path) -> bool:
    """Whether `error`, raised while writing into `folder`, came from a full disk (or quota)."""
    texts = []
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        texts.append(str(e))
    text = " ".join(texts)
    if any(word in text for word in _FULL_DISK_WORDS):
        return True
    if any(word in text for word in _WRITE_FAILED_WORDS):  # torch's writer does not say why; the disk does
        free = free_bytes(folder)
        return free is not None and free < _NEARLY_FULL
    return False


def megabytes_to_free(needed: int, folder: str | Path) -> int:
    """Whole MB (10^6 bytes) to free in `folder`'s filesystem for a write of `needed` bytes, with a
    tenth more for the files written beside it."""
    free = free_bytes(folder) or 0
    return max(1, math.ceil((needed * 1.1 - free) / 1e6))


def no_space_sentence(path: str | Path, needed: int, folder: str | Path, what_to_choose: str, after: str) -> str:
    """'no space left on device while writing PATH: free N MB or choose another WHAT; AFTER'."""
    return (f"no space left on device while writing {path}: free {megabytes_to_free(needed, folder)} MB or choose "
            f"another {what_to_choose}; {after}")


class OutOfSpace(Nf4tuneError):
    """A write found the disk full: `path` was being written, `needed` bytes (about) were wanted."""

    def __init__(self, path: str | Path, needed: int, folder: str | Path, what_to_choose: str = "output folder",
                 after: str = "nothing was replaced."):
        self.path, self.needed, self.folder = Path(path), needed, Path(folder)
        super().__init__(no_space_sentence(path, needed, folder, what_to_choose, after))


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under `folder` (0 if it is absent)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
