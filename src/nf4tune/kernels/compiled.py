"""`torch.compile` with a way back, for the few hot kernels that eager PyTorch runs as many passes.

Each compiled kernel is an ordinary function that eager PyTorch also runs (the reference the tests
hold it to). Where compiling fails (no C++ compiler, an unsupported platform) `run` says so once and
`broken` keeps every caller on the plain functions for the rest of the process. Whether to compile
at all (the size threshold, NF4TUNE_COMPILE) is `nf4tune.dispatch`'s choice, not this module's.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

broken = False
broken_reason = ""


def run(compiled: Callable, fallback: Callable, *args):
    """`compiled(*args)`, or `fallback(*args)` if this machine cannot compile (said once)."""
    global broken, broken_reason
    if not broken:
        try:
            return compiled(*args)
        except Exception as e:  # a missing C++ compiler, an unsupported platform, ...
            broken, broken_reason = True, str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("nf4tune: torch.compile is unavailable (%s); using the reference kernels.", broken_reason)
    return fallback(*args)
