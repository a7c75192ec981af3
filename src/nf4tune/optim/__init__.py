"""Optimizers: paged AdamW with 32-bit or 8-bit states."""

from .paged_adamw import PagedAdamW, PagedAdamW8bit
from ..registry import OPTIMIZERS, OptimizerSpec

__all__ = ["OPTIMIZERS", "OptimizerSpec", "PagedAdamW", "PagedAdamW8bit"]
