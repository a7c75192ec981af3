"""Optimizers: paged AdamW with 32-bit or 8-bit states."""

from .paged_adamw import PagedAdamW, PagedAdamW8bit

__all__ = ["PagedAdamW", "PagedAdamW8bit"]
