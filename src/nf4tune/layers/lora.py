"""LoRA configuration and attaching adapters to a model's 4-bit linear layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import Nf4tuneError
from .experts4bit import ExpertWeight4bit
from .linear4bit import Linear4bit


@dataclass
class LoraConfig:
    """Low-rank adapters on the frozen 4-bit layers. Defaults follow the QLoRA paper.

    Args:
        r: rank of the update B @ A.
        alpha: scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the adapter's input while training.
        target_modules: "all-linear" (every quantized linear layer of the blocks, not lm_head, and the
            experts of a mixture-of-experts model), a list of module names matched as PEFT does (the full
            name or its last parts, e.g. "q_proj", or "experts.gate_up_proj" for the fused expert weights),
            or a regular expression matched against full module names. Expert adapters take no dropout
            (PEFT's per-expert LoRA, `target_parameters`, has none).
        use_rslora: rank-stabilized scaling alpha / sqrt(r).
    """

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = field(default="all-linear")
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise Nf4tuneError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if not 0 <= self.dropout < 1:
            raise Nf4tuneError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")

    def matches(self, name: str) -> bool:
        """Whether the module called `name` gets an adapter (among the 4-bit layers)."""
        if self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in self.target_modules)


def lora_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """The 4-bit layers of `model` that carry an adapter, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.lora_A is not None}


def inject_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every parameter of `model` and attach adapters to the matching 4-bit layers.

    Returns the names of the layers that got one; raises if none matched.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    kinds = (Linear4bit, ExpertWeight4bit)
    chosen = [n for n, m in model.named_modules() if isinstance(m, kinds) and config.matches(n)]
    if not chosen:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        raise Nf4tuneError(
            f"LoRA target_modules {config.target_modules!r} matches no 4-bit linear layer; this model has {available}."
        )
    for name in chosen:
        layer = model.get_submodule(name)
        if isinstance(layer, ExpertWeight4bit):
            layer.add_lora(config.r, config.alpha, config.use_rslora)
        else:
            layer.add_lora(config.r, config.alpha, config.dropout, config.use_rslora)
    return chosen


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their number of elements, whether
    their storage is held as buffers or (for sharding) as frozen parameters. A sharded parameter counts
    whole (a DTensor's numel is its global one), so every rank gives one process's figures."""
    storage = {id(getattr(m, name)) for m in model.modules() if isinstance(m, (Linear4bit, ExpertWeight4bit))
               for name in m.STORAGE}
    params = [p for p in model.parameters() if id(p) not in storage]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.layout.numel for m in model.modules() if isinstance(m, Linear4bit) and m.layout is not None)
    total += sum(m.shape.numel() for m in model.modules() if isinstance(m, ExpertWeight4bit))
    return trainable, total
