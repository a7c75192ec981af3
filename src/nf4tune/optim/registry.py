"""The optimizers a recipe, the CLI and `estimate` may name: one registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .paged_adamw import PagedAdamW, PagedAdamW8bit


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name: how to build it and what its states cost.

    Args:
        build: called as `build(param_groups, lr=..., betas=..., eps=...)`.
        state_bytes: bytes of optimizer state per trainable parameter.
        pageable: whether the states can live in host memory between steps.
    """

    build: Callable[..., torch.optim.Optimizer]
    state_bytes: float
    pageable: bool


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "paged_adamw_32bit": OptimizerSpec(PagedAdamW, 8.0, True),
    "paged_adamw_8bit": OptimizerSpec(PagedAdamW8bit, 2 + 8 / 256, True),  # two 8-bit moments + a float per 256
    "adamw_torch": OptimizerSpec(torch.optim.AdamW, 8.0, False),
}
