"""Growing a model's vocabulary: the input embeddings and output head resized, the new rows at the
mean of the old ones (how they train is train/tokens.py)."""

from __future__ import annotations

import torch
from torch import nn


def grow_rows(model, size: int) -> None:
    """Resize the vocabulary matrices to `size` rows (frozen), the new rows at the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    resize_vocab(model, size)
    for module in vocab_modules(model):
        with torch.no_grad():
            module.weight[old:] = module.weight[:old].float().mean(0).to(module.weight.dtype)


def vocab_modules(model) -> list[nn.Module]:
    """The input embeddings, and the output head unless it is tied to them."""
    modules = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not modules[0].weight:
        modules.append(head)
    return modules


def resize_vocab(model, size: int) -> None:
    """Resize the input embeddings and output head to `size` rows (new rows are left to the caller)."""
    model.resize_token_embeddings(size, mean_resizing=False)
    for module in vocab_modules(model):
        module.weight.requires_grad_(False)
