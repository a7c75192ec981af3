"""Causal-LM loss from the final hidden states, a chunk of tokens at a time.

Only positions with a label are projected to the vocabulary. Each chunk's gradient with respect to
the hidden states is computed in the forward pass, while its logits exist, and handed back in
backward: the batch x seq x vocab logits tensor never exists, and no logits are recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

# Families whose head is a plain linear projection of the last hidden state (no logit scaling).
CHUNKED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden.to(head.weight.dtype)).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token losses over chunks; d loss / d hidden (and d loss / d head weight, when it
    trains) is computed chunk by chunk in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, chunk_tokens):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_tokens):
            h = hidden[start:start + chunk_tokens].detach().requires_grad_()
            with torch.enable_grad():
                loss = _chunk_loss(head, h, targets[start:start + chunk_tokens])
                inputs = (h, weight) if grad_weight is not None else (h,)
                grads = torch.autograd.grad(loss, inputs)
            grad_hidden[start:start + chunk_tokens] = grads[0]
            if grad_weight is not None:
                grad_weight += grads[1]
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_total, None, None, None)


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
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, head.weight, targets, head, chunk_tokens), targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        total = total + _chunk_loss(head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
    return total, targets.numel()
