"""Whole models: loading Hugging Face checkpoints in 4-bit, adapters on disk, merging."""

from .adapters import load_adapter, save_adapter
from .load import load_model

__all__ = ["load_adapter", "load_model", "save_adapter"]
