"""One writer per output: a lock file naming the process (id and host) that writes there.

Two `nf4tune train` runs into one folder would interleave `metrics.jsonl` and overwrite each other's
checkpoints, and a later `--resume` would continue from a mix; two `generate --out` runs would
interleave their lines. The first takes the lock; the second is refused with a sentence naming it.

The lock is a file holding `{"pid", "host", "started", "command"}`, held with `flock` while the
process lives: the kernel releases it when the process ends however it ends (even SIGKILL), so a
lock left behind by a killed run is recognised (the flock is free) and taken over with a log line.
The pid and host are for people (the refusal names them) and for filesystems where `flock` is not
shared between hosts: a lock naming another host is never taken over, since from here it cannot be
told whether that process still runs.

Locks are re-entrant within a process (the CLI takes the folder's lock before its checks, and the
training loop takes it again), and released when the last holder releases it; the file is then removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import Nf4tuneError

log = logging.getLogger("nf4tune")

_held: dict[Path, "OutputLock"] = {}  # this process's locks, by resolved path
_guard = threading.Lock()


@dataclass
class Holder:
    """Who a lock file says holds it."""

    pid: int | None
    host: str
    started: str = ""

    def describe(self) -> str:
        if self.pid is None:  # taken this instant, not written yet (or written by something else)
            return "a process that has not written its id into the lock file yet"
        started = f", started {self.started}" if self.started else ""
        return f"process {self.pid} on {self.host}{started}"


class OutputLock:
    """A held lock; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd, self.count = path, fd, 1

    def release(self) -> None:
        """Give up one hold; the last one removes the file and frees the lock."""
        with _guard:
            self.count -= 1
            if self.count > 0:
                return
            if _held.get(self.path) is self:
                del _held[self.path]
            self._close()

    def relocate(self, moved_to: Path, new_path: str | Path, in_use: str, remedy: str) -> "OutputLock":
        """The folder holding this lock file was renamed (its file is now `moved_to`): take the lock
        at `new_path` for as many holders as this one had, then drop the moved file."""
        with _guard:
            if _held.get(self.path) is self:
                del _held[self.path]
        try:
            new = acquire(new_path, in_use, remedy)
        finally:
            self.path = Path(moved_to)
            self._close()
        new.count += self.count - 1
        return new

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):  # never remove a lock another process has since taken
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing frees the flock

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(path: str | Path, in_use: str, remedy: str = "choose another output") -> OutputLock:
    """Take the lock file `path` for this process, or raise `Nf4tuneError` when another live process
    holds it: `in_use` starts the sentence ("runs/a is in use by another training run"), the holder
    follows, then "wait for it to end or stop it, or `remedy`". A lock left by a process that has
    ended is taken over."""
    path = Path(path).absolute()
    key = path.resolve()
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            mine.count += 1
            return mine
        for _ in range(10):  # another process may remove or replace the file between open and flock
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise Nf4tuneError(f"{in_use} ({read_holder(path).describe()}; lock file {path}): wait for it to "
                                   f"end or stop it, or {remedy}.") from None
            if not _same_file(fd, path):  # the holder removed the file as we opened it: try the new one
                os.close(fd)
                continue
            try:
                _take(fd, path, in_use)
            except BaseException:
                os.close(fd)
                raise
            lock = OutputLock(key, fd)
            _held[key] = lock
            return lock
    raise Nf4tuneError(f"{in_use}: the lock file {path} keeps changing; another process is taking it.")


def _take(fd: int, path: Path, in_use: str) -> None:
    """With the flock held: check what the file says (a leftover of an ended run, or of another host),
    then write this process into it."""
    before = _parse(os.pread(fd, 4096, 0))
    here = socket.gethostname()
    if before is not None and before.pid is not None and before.pid != os.getpid():
        if before.host != here:
            raise Nf4tuneError(f"{in_use} ({before.describe()}; lock file {path}): if that run has ended, delete "
                               "the lock file and run again.")
        # The flock was free, so the process that wrote the file no longer holds it: it has ended.
        log.warning("nf4tune: taking over the lock %s left by %s, which has ended", path, before.describe())
    record = {"pid": os.getpid(), "host": here, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def read_holder(path: str | Path) -> Holder:
    """What the lock file at `path` says (an unknown holder when it cannot be read)."""
    try:
        found = _parse(Path(path).read_bytes())
    except OSError:
        found = None
    return found or Holder(None, "an unknown host")


def _parse(data: bytes) -> Holder | None:
    try:
        record = json.loads(data.decode("utf-8"))
        return Holder(int(record["pid"]), str(record["host"]), str(record.get("started", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

