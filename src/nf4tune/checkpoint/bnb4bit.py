"""Reassembling bitsandbytes 4-bit weights from a checkpoint streamed tensor by tensor."""

from __future__ import annotations

import json

import torch

from ..quant import QuantizedTensor

_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
             ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


class QuantizedWeightAssembler:
    """Collects the parts of each 4-bit weight (packed bytes, absmax, quant state, ...), which may
    arrive in any order and across shards, and hands back a `QuantizedTensor` once one is complete."""

    def __init__(self, weight_keys: set[str]):
        self.weight_keys = weight_keys
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def owner(self, key: str) -> str | None:
        """The 4-bit weight `key` is a part of, or None."""
        for suffix in _SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in self.weight_keys:
                return key[: -len(suffix)]
        return key if key in self.weight_keys else None

    def add(self, key: str, tensor: torch.Tensor) -> tuple[str, QuantizedTensor] | None:
        """Take one part; return (weight key, weight) when that weight is complete."""
        owner = self.owner(key)
        parts = self.pending.setdefault(owner, {})
        parts[key] = tensor
        if not self._complete(parts, owner):
            return None
        return owner, QuantizedTensor.from_bnb_state_dict(self.pending.pop(owner), owner)

    @staticmethod
    def _complete(parts: dict[str, torch.Tensor], key: str) -> bool:
        state = next((k for k in parts if ".quant_state." in k), None)
        if key not in parts or f"{key}.absmax" not in parts or state is None:
            return False
        meta = json.loads(bytes(parts[state].tolist()).decode("utf-8"))
        return "nested_offset" not in meta or f"{key}.nested_absmax" in parts
