"""Optimizers: paged AdamW with 32-bit or 8-bit states."""

from ..registry import OPTIMIZERS, OptimizerSpec
from .paged_adamw import PagedAdamW, PagedAdamW8bit

__all__ = ["OPTIMIZERS", "OptimizerSpec", "PagedAdamW", "PagedAdamW8bit"]
