"""`torch.compile` for the few hot kernels that eager PyTorch runs as many passes, with a way back.

Each fast path is an ordinary function that eager PyTorch also runs (the reference the tests hold
it to). `Compiled(fn)` calls the compiled version on CPU for inputs big enough to repay the
compilation, and the plain function otherwise. Where compiling fails (no C++ compiler, an
unsupported platform) it says so once and stays on the plain functions for the whole process.

Set NF4TUNE_COMPILE=0 to never compile.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Below this many elements compilation costs more than it saves.
COMPILE_MIN_NUMEL = 1 << 20
broken = False


def enabled(t: torch.Tensor, numel: int | None = None) -> bool:
    """Whether a kernel on `t` (or on `numel` elements of work) should take the compiled path."""
    return (
        not broken
        and t.device.type == "cpu"
        and (t.numel() if numel is None else numel) >= COMPILE_MIN_NUMEL
        and os.environ.get("NF4TUNE_COMPILE", "1") != "0"
    )


def run(compiled: Callable, fallback: Callable, *args):
    """`compiled(*args)`, or `fallback(*args)` if this machine cannot compile (said once)."""
    global broken
    if not broken:
        try:
            return compiled(*args)
        except Exception as e:  # a missing C++ compiler, an unsupported platform, ...
            broken = True
            log.warning("nf4tune: torch.compile is unavailable (%s); using the reference kernels.",
                        str(e).splitlines()[0])
    return fallback(*args)


class Compiled:
    """`fn`, compiled on first use where `enabled` says so for the first tensor argument."""

    def __init__(self, fn: Callable, dynamic: bool = True):
        self.fn, self.dynamic, self._compiled = fn, dynamic, None

    def __call__(self, *args):
        if not enabled(args[0]):
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic)
        return run(self._compiled, self.fn, *args)
