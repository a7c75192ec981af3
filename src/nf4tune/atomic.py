"""Atomic file and folder writes with the permissions a plain `open()` / `mkdir` would give.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 folders whatever the umask; renamed into
place they would leave outputs readable by their owner only (a serving container or a colleague
running as another user could not read them). Every writer in nf4tune makes its temporary files and
folders here, so they get `0666 & ~umask` / `0777 & ~umask` as `open()` and `mkdir` do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is process-wide,
    so setting it to read it could race with another thread creating a file)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder."""
    return 0o777 & ~current_umask()


def temp_dir(parent: str | Path, prefix: str, suffix: str = ".partial") -> Path:
    """A new hidden temporary folder in `parent` with `mkdir`'s permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(path, dir_mode())
    return path


def temp_file(parent: str | Path, prefix: str, suffix: str = ".partial") -> Path:
    """A new empty hidden temporary file in `parent` with `open()`'s permissions."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(name)


def give_file_mode(path: str | Path) -> None:
    """Set `open()`'s permissions on a file another library wrote (safetensors creates its files 0600)."""
    os.chmod(path, file_mode())


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(temporary_path)` and rename the result onto `path`: readers see the old file or the
    complete new one, never a partial one. The temporary file is removed on any failure."""
    path = Path(path)
    tmp = temp_file(path.parent, f".{path.name}.")
    try:
        write(str(tmp))
        give_file_mode(tmp)  # the writer may have replaced the file (safetensors makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`. An existing empty `final` is replaced and its
    permissions kept (the user made it, maybe with a mode of their choosing); anything else there
    is removed first (the callers check beforehand that replacing it is wanted)."""
    if final.is_dir() and not final.is_symlink():
        if not any(final.iterdir()):
            os.chmod(tmp, final.stat().st_mode & 0o7777)
            final.rmdir()
        else:
            shutil.rmtree(final)
    elif final.exists() or final.is_symlink():
        final.unlink()
    tmp.rename(final)
