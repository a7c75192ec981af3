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


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); whichever this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


MIN_SHARED = 16  # shared prefixes shorter than this are not worth a separate pass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tail_logits(model, seqs: Sequence[Sequence[int]], keep: Sequence[int], batch_size: int,
                pad_id: int, on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """For each token sequence, the float32 logits of its last `keep[i]` positions, shape (keep[i], vocab).

    Sequences are run in sorted order in left-padded batches, with positions counted from each sequence's
    first real token, so padding changes nothing but rounding; only the kept positions reach the head.
    Tokens a batch's sequences all start with (few-shot examples of one subject) are run once, and their
    keys and values serve every batch that starts with them."""
    import copy

    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))  # neighbours share the longest prefixes
    out: list[torch.Tensor | None] = [None] * len(seqs)
    device = model.device
    shared_ids: tuple = ()
    shared_cache = None
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            # The prefix every row starts with, leaving each row at least its kept positions.
            n = min(common_prefix(seqs[rows[0]], seqs[rows[-1]]), min(len(seqs[i]) - keep[i] for i in rows))
            if getattr(model.config, "is_encoder_decoder", False) or n < MIN_SHARED:
                n = 0
            if n and shared_ids and n >= len(shared_ids) and tuple(seqs[rows[0]][:len(shared_ids)]) == shared_ids:
                n = len(shared_ids)  # the prefix already run serves this batch too
            elif n:
                prefix = torch.tensor([list(seqs[rows[0]][:n])], dtype=torch.long, device=device)
                result = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
                shared_cache = getattr(result, "cache", None) or result.past_key_values
                shared_ids = tuple(seqs[rows[0]][:n])
            tails = [seqs[i][n:] for i in rows]
            width = max(len(t) for t in tails)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, t in enumerate(tails):
                ids[r, width - len(t):] = torch.tensor(list(t), dtype=torch.long)
                mask[r, width - len(t):] = 1
            positions = n + (mask.cumsum(1) - 1).clamp(min=0)
            k = max(keep[i] for i in rows)
            kwargs = dict(use_cache=False)
            if n:
                cache = copy.deepcopy(shared_cache)
                cache.batch_repeat_interleave(len(rows))
                mask = torch.cat([torch.ones((len(rows), n), dtype=torch.long), mask], 1)
                kwargs = dict(use_cache=True, **{_cache_argument(model): cache})
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=k, **kwargs).logits
            logits = logits[:, -k:].float().cpu()
            for r, i in enumerate(rows):
                out[i] = logits[r, k - keep[i]:]
            if on_batch is not None:
                on_batch(len(rows))
    return out  # type: ignore[return-value]
