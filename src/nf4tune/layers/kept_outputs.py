"""Keeping the 4-bit layers' outputs through a gradient-checkpointed region, so its recompute skips them.

Gradient checkpointing runs a region (a decoder layer) twice: in forward, keeping only its inputs,
and again in backward to rebuild what backward needs. Most of that second run is the 4-bit matmuls,
which give exactly the outputs they gave the first time. A `KeptOutputs` region keeps each 4-bit
layer's output from the first run (up to a byte budget shared by all regions) and hands it back in
the second, so the recompute does only what lies between the matmuls (norms, rotary, attention,
SwiGLU, the LoRA products). Gradients are unchanged: the kept tensors are the first run's own.

The price is their memory: per token and layer, the layers' output widths in the compute dtype
(about 10 x hidden values for a Llama block) against the hidden size alone for plain checkpointing.
Hence the budget: once it is spent, later layers are recomputed as usual.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager

import torch

DEFAULT_BUDGET_GIB = 1.0  # what `model.nf4tune.kept_outputs_gib` starts at; `nf4tune estimate` counts it
# Up to this many tokens (batch x sequence) a step keeps up to the whole budget; beyond, the budget shrinks in
# proportion (twice the tokens, half the budget), so a long sequence's step spends its memory on what it cannot
# recompute (the layers' inputs, one layer's activations) rather than on what saves a recompute.
FULL_BUDGET_TOKENS = 4096

_local = threading.local()


def budget_bytes(budget_gib: float, tokens: int) -> int:
    """The kept outputs' budget for a step of `tokens` tokens: `budget_gib` GiB up to `FULL_BUDGET_TOKENS`
    tokens, shrinking as 1 / tokens beyond."""
    return int(budget_gib * 2**30 * min(1.0, FULL_BUDGET_TOKENS / max(tokens, 1)))


def current() -> "KeptOutputs | None":
    """The region running on this thread, if any."""
    return getattr(_local, "region", None)


_kept = [0]  # bytes held by all regions (a region that is never replayed gives its share back when freed)


def kept_bytes() -> int:
    """Bytes of outputs kept by the live regions and not yet handed back."""
    return _kept[0]


def _count(nbytes: int) -> None:
    _kept[0] += nbytes


class KeptOutputs:
    """The kept outputs of one checkpointed region, in call order: `keep` during its first run,
    `take` during its recompute. `budget_bytes` caps what all live regions hold at once."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: deque = deque()
        self.replaying = False

    @contextmanager
    def running(self, replay: bool):
        """Make this the current region: the first run (`replay=False`) keeps, the recompute takes."""
        previous, _local.region, self.replaying = current(), self, replay
        try:
            yield self
        finally:
            _local.region = previous
            if replay:  # whatever the recompute did not take (it can stop early) is dropped now
                self.clear()

    def keep(self, module, output: torch.Tensor) -> None:
        """During the first run: keep `module`'s output if the budget allows (else record a gap)."""
        if self.replaying:
            return
        nbytes = output.numel() * output.element_size()
        if kept_bytes() + nbytes > self.budget:
            self.entries.append((module, None, 0, 0))
            return
        # detached: the kept tensor must not carry the first run's graph; its version counter is shared,
        # so an in-place change after keeping is seen at `take`.
        self.entries.append((module, output.detach(), output._version, nbytes))
        _count(nbytes)

    def take(self, module) -> torch.Tensor | None:
        """During the recompute: `module`'s kept output, or None (recompute it). A module out of order
        or an output changed in place since it was kept drops what is left (always safe)."""
        if not self.replaying or not self.entries:
            return None
        kept_module, output, version, nbytes = self.entries.popleft()
        _count(-nbytes)
        if kept_module is not module:
            self.clear()
            return None
        if output is None or output._version != version:
            return None
        return output

    def clear(self) -> None:
        entries = getattr(self, "entries", None)  # absent if __init__ never ran (a traced, discarded object)
        if entries:
            _count(-sum(entry[3] for entry in entries))
            entries.clear()

    def __del__(self):  # a forward that never got its backward (the graph was dropped)
        self.clear()


class KeepOutputsCheckpoint:
    """A checkpoint function (as transformers' layers call it: `func(function, *args, **kwargs)`) that
    runs `checkpoint` with a `KeptOutputs` region around `function`'s first run and its recompute.

    Args:
        checkpoint: the checkpoint function to wrap (e.g. `functools.partial(torch.utils.checkpoint.checkpoint,
            use_reentrant=False)`).
        budget_gib: a callable giving the current budget in GiB (read at each call, so changing it
            takes effect at the next step); 0 is plain checkpointing. A step of more than
            `FULL_BUDGET_TOKENS` tokens gets a share of it (`budget_bytes`).
    """

    def __init__(self, checkpoint, budget_gib):
        self.checkpoint, self.budget_gib = checkpoint, budget_gib

    def __call__(self, function, *args, **kwargs):
        hidden = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("hidden_states"))
        tokens = hidden.numel() // hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() else 0
        budget = budget_bytes(self.budget_gib(), tokens)
        # Under torch.compile the 4-bit layers run as one custom op that keeps nothing, and the region's
        # bookkeeping would be a side effect the compiled checkpoint cannot replay: plain checkpointing.
        if budget <= 0 or torch.compiler.is_compiling():
            return self.checkpoint(function, *args, **kwargs)
        region, runs = KeptOutputs(budget), []

        def run(*a, **k):
            runs.append(None)
            with region.running(replay=len(runs) > 1):
                return function(*a, **k)

        return self.checkpoint(run, *args, **kwargs)


__all__ = ["FULL_BUDGET_TOKENS", "KeepOutputsCheckpoint", "KeptOutputs", "budget_bytes", "current", "kept_bytes"]
