"""Checkpoint keys as the model names them, for checkpoints streamed tensor by tensor.

transformers 5 renames and fuses some checkpoint tensors as it loads them (its conversion mapping): a MoE
checkpoint on the Hub (and as `save_pretrained` writes it) holds each expert's `gate_proj` / `up_proj` /
`down_proj` (Mixtral: `w1` / `w3` / `w2` under `block_sparse_moe`), which transformers stacks into the
experts module's fused 3-D `gate_up_proj` and `down_proj`. `KeyConverter` applies the same transforms,
transformers' own, one tensor at a time: renamed keys pass straight through, and the per-expert tensors
of one fused parameter are held only until the last of them arrives (one layer's experts, never the
model), then fused by transformers' operations.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ..errors import Nf4tuneError


def _natural(key: str) -> list:
    """Sort key ordering "experts.2" before "experts.10", as transformers orders the tensors it fuses."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


class _Pending:
    """The per-expert tensors collected so far for one fused target."""

    def __init__(self, converter, expected: int | None):
        self.converter, self.expected = converter, expected
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}  # source pattern -> {checkpoint key: tensor}

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.tensors.values())

    def fuse(self, target: str) -> torch.Tensor:
        converter = self.converter
        collected = {pattern: [tensors[k] for k in sorted(tensors, key=_natural)]
                     for pattern, tensors in self.tensors.items()}
        self.tensors = {}
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns, full_layer_name=target)
        (fused,) = collected.values()
        return fused


class KeyConverter:
    """Rename (and fuse) checkpoint tensors into `model`'s parameter names with transformers' conversion
    mapping for the model.

    Args:
        model: the transformers model (on the meta device) the checkpoint is loaded into, before nf4tune
            swaps any of its modules: the fused parameters' shapes say how many tensors each one awaits.
    """

    def __init__(self, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        self.pending: dict[str, _Pending] = {}
        # Only a model with fused expert parameters has its keys converted: dense checkpoints load by their
        # names as they always have.
        self.converts_experts = any(len(shape) == 3 for shape in self.shapes.values())
        transforms = get_model_conversion_mapping(model, add_legacy=False) if self.converts_experts else []
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def _rename(self, key: str):
        for renaming in self.renamings:
            key, _ = renaming.rename_source_key(key)
        for converter in self.converters:  # at most one converter takes a key, as in transformers
            renamed, pattern = converter.rename_source_key(key)
            if pattern is not None:
                return renamed, converter, pattern
        return key, None, None

    def feed(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The (model key, tensor) pairs `key` completes: itself renamed, nothing while a fused parameter
        still waits for tensors, or the fused parameter once its last tensor has come."""
        if not self.converters and not self.renamings:
            yield key, tensor
            return
        target, converter, pattern = self._rename(key)
        if converter is None:
            yield target, tensor
            return
        pending = self.pending.get(target)
        if pending is None:
            shape = self.shapes.get(target)
            # a fused (experts, ...) parameter is stacked from one tensor per expert and source pattern
            expected = shape[0] * len(converter.source_patterns) if shape is not None and len(shape) == 3 else None
            pending = self.pending[target] = _Pending(converter, expected)
        pending.tensors.setdefault(pattern, {})[key] = tensor
        if pending.expected is not None and pending.count == pending.expected:
            del self.pending[target]
            yield target, pending.fuse(target)

    def finish(self, path) -> Iterator[tuple[str, torch.Tensor]]:
        """Fuse what waits for a parameter of unknown size; refuse a fused parameter that lacks tensors."""
        for target, pending in list(self.pending.items()):
            if pending.expected is None:
                del self.pending[target]
                yield target, pending.fuse(target)
        if self.pending:
            target, pending = next(iter(self.pending.items()))
            raise Nf4tuneError(
                f"{path} lacks {_first_missing(pending)} (and {pending.expected - pending.count - 1} more per-expert "
                f"tensor(s) of the {pending.expected} fused into {target}); the checkpoint is incomplete."
            )


def _first_missing(pending: _Pending) -> str:
    """A checkpoint key the fused parameter awaits: an expert index some source pattern lacks."""
    experts = pending.expected // len(pending.converter.source_patterns)
    keys = [k for tensors in pending.tensors.values() for k in tensors]
    index = re.compile(r"\.(\d+)\.(?!.*\.\d+\.)")  # the last numeric segment: the expert's index
    for pattern in pending.converter.source_patterns:
        have = pending.tensors.get(pattern, {})
        example = next(iter(have or {}), None)
        if example is None:  # none of this pattern: name one from a key of another pattern
            return f"every tensor matching {pattern!r} (e.g. for {keys[0]})"
        present = {int(index.search(k).group(1)) for k in have if index.search(k)}
        for e in range(experts):
            if e not in present:
                return index.sub(f".{e}.", example, count=1)
    return "per-expert tensors"
