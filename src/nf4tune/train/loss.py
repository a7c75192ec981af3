"""Causal-LM loss from the final hidden states, a chunk of tokens at a time.

Only positions with a label are projected to the vocabulary, and each chunk's logits are
recomputed in backward rather than kept, so the batch x seq x vocab logits tensor never exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

# Families whose head is a plain linear projection of the last hidden state (no logit scaling).
CHUNKED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden.to(head.weight.dtype)).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens) for one batch."""
    labels = batch["labels"]
    if model.config.model_type not in CHUNKED_FAMILIES:  # T5 and unknown heads: the model's own loss
        out = model(**batch, use_cache=False)
        count = int((labels[:, 1:] != IGNORE_INDEX).sum()) if not model.config.is_encoder_decoder else \
            int((labels != IGNORE_INDEX).sum())
        return out.loss * count, count
    backbone = getattr(model, model.base_model_prefix)
    # No KV cache: training needs none, and transformers reads packed rows' boundaries from
    # position_ids only when there is no cache.
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        total = total + (checkpoint(_chunk_loss, head, h, t, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_loss(head, h, t))
    return total, targets.numel()
