"""Batched forward passes that return only the logits needed: the last few positions of each sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def context_length(model, tokenizer=None) -> int:
    """The longest sequence the model takes: its position limit, or the tokenizer's where that is smaller."""
    config = model.config
    limit = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**7:  # tokenizers without a limit report a huge number
        limit = min(limit, tok_limit) if limit else tok_limit
    return limit or 2048


def tail_logits(model, seqs: Sequence[Sequence[int]], keep: Sequence[int], batch_size: int,
                pad_id: int, on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """For each token sequence, the float32 logits of its last `keep[i]` positions, shape (keep[i], vocab).

    Sequences are run longest first in left-padded batches, with positions counted from each sequence's
    first real token, so padding changes nothing but rounding; only the kept positions reach the head."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    device = model.device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, width - len(seqs[i]):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            k = max(keep[i] for i in rows)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=k, use_cache=False).logits
            logits = logits[:, -k:].float().cpu()
            for r, i in enumerate(rows):
                out[i] = logits[r, k - keep[i]:]
            if on_batch is not None:
                on_batch(len(rows))
    return out  # type: ignore[return-value]
