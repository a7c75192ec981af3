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

CPU training's causal attention keeps its output and log-sum-exp here too (`layers.chunked_attention`):
per byte they spare far more than a matmul's output does (a whole attention forward, whose work grows as
tokens^2, for hidden + heads values per token). So they come first: a 4-bit output is kept only while it and
everything kept so far (attention's included) fit the budget, and attention's are kept while they alone fit
the unshrunk budget (`ATTENTION`'s), so a long step whose first layers' 4-bit outputs spent its shrunk
budget still keeps every layer's attention.
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

MATMUL, ATTENTION = "matmul", "attention"  # the two pools a region keeps from (see the module doc)

_local = threading.local()


def budget_bytes(budget_gib: float, tokens: int) -> int:
    """The kept outputs' budget for a step of `tokens` tokens: `budget_gib` GiB up to `FULL_BUDGET_TOKENS`
    tokens, shrinking as 1 / tokens beyond."""
    return int(budget_gib * 2**30 * min(1.0, FULL_BUDGET_TOKENS / max(tokens, 1)))


def current() -> "KeptOutputs | None":
    """The region running on this thread, if any."""
    return getattr(_local, "region", None)


# bytes held by all regions, per pool (a region that is never replayed gives its share back when freed)
_kept = {MATMUL: 0, ATTENTION: 0}


def kept_bytes(pool: str | None = None) -> int:
    """Bytes of outputs kept by the live regions and not yet handed back (in `pool`, or in all)."""
    return sum(_kept.values()) if pool is None else _kept[pool]


def _count(pool: str, nbytes: int) -> None:
    _kept[pool] += nbytes


class KeptOutputs:
    """The kept outputs of one checkpointed region, in call order: `keep` during its first run,
    `take` during its recompute. A 4-bit output (`MATMUL`) is kept while all that the live regions hold
    stays within `budget_bytes`; attention's (`ATTENTION`) while attention's alone stay within
    `attention_budget_bytes`."""

    def __init__(self, budget_bytes: int, attention_budget_bytes: int = 0):
        self.budgets = {MATMUL: budget_bytes, ATTENTION: attention_budget_bytes}
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

    def keep(self, module, output: torch.Tensor, pool: str = MATMUL) -> None:
        """During the first run: keep `module`'s output if `pool`'s budget allows (else record a gap)."""
        if self.replaying:
            return
        nbytes = output.numel() * output.element_size()
        held = kept_bytes(ATTENTION) if pool == ATTENTION else kept_bytes()
        if held + nbytes > self.budgets[pool]:
            self.entries.append((module, None, 0, 0, pool))
            return
        # detached: the kept tensor must not carry the first run's graph; its version counter is shared,
        # so an in-place change after keeping is seen at `take`.
        self.entries.append((module, output.detach(), output._version, nbytes, pool))
        _count(pool, nbytes)

    def take(self, module) -> torch.Tensor | None:
        """During the recompute: `module`'s kept output, or None (recompute it). A module out of order
        or an output changed in place since it was kept drops what is left (always safe)."""
        if not self.replaying or not self.entries:
            return None
        kept_module, output, version, nbytes, pool = self.entries.popleft()
        _count(pool, -nbytes)
        if kept_module is not module:
            self.clear()
            return None
        if output is None or output._version != version:
            return None
        return output

    def clear(self) -> None:
        entries = getattr(self, "entries", None)  # absent if __init__ never ran (a traced, discarded object)
        if entries:
            for _, _, _, nbytes, pool in entries:
                _count(pool, -nbytes)
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
            takes effect at the next step); 0 is plain checkpointing. The 4-bit outputs of a step of more
            than `FULL_BUDGET_TOKENS` tokens get a share of it (`budget_bytes`); attention's all of it.
    """

    def __init__(self, checkpoint, budget_gib):
        self.checkpoint, self.budget_gib = checkpoint, budget_gib

    def __call__(self, function, *args, **kwargs):
        hidden = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("hidden_states"))
        tokens = hidden.numel() // hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() else 0
        gib = self.budget_gib()
        # Under torch.compile the 4-bit layers run as one custom op that keeps nothing, and the region's
        # bookkeeping would be a side effect the compiled checkpoint cannot replay: plain checkpointing.
        if gib <= 0 or torch.compiler.is_compiling():
            return self.checkpoint(function, *args, **kwargs)
        region, runs = KeptOutputs(budget_bytes(gib, tokens), int(gib * 2**30)), []

        def run(*a, **k):
            runs.append(None)
            with region.running(replay=len(runs) > 1):
                return function(*a, **k)

        return self.checkpoint(run, *args, **kwargs)


__all__ = ["ATTENTION", "FULL_BUDGET_TOKENS", "MATMUL", "KeepOutputsCheckpoint", "KeptOutputs", "budget_bytes", "current",
           "kept_bytes"]
