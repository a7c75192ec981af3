"""Exact match of a generated chat reply with the target reply, both ended at the end-of-turn token.

A chat template writes text after the end-of-turn token (ChatML: `<|im_end|>` then a newline); the model
stops at the token, so that text never appears in a generation and must not count against it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# End-of-turn tokens of common chat templates, besides the tokenizer's eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def end_of_turn_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's generation eos ids, and the known
    end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def trim_at_end_of_turn(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """`ids` up to and including the first stop token (all of them when none occurs)."""
    stop = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stop:
            return list(ids[:i + 1])
    return list(ids)


def reply_matches(generated: Sequence[int], target: Sequence[int], stop_ids: Iterable[int]) -> bool:
    """Whether the generated reply equals the target reply, both ended at their first end-of-turn token:
    what the template writes after it is ignored, and a reply that never stops does not match a target that does.
    A target without an end-of-turn token (cut at a maximum length) is compared over its own length."""
    stop = set(stop_ids)
    target = trim_at_end_of_turn(target, stop)
    if not target or target[-1] not in stop:  # a target cut short (max length) is compared over its length
        return list(generated[:len(target)]) == target
    return trim_at_end_of_turn(generated, stop) == target


def _greedy(model, ids: torch.Tensor, mask: torch.Tensor, budget: int, stop: set[int], pad_id: int) -> list[list[int]]:
    """Greedy replies to left-padded prompts (each up to and including its stop token): through nf4tune's
    CPU decoder where it runs the model, else transformers' `generate`, behind one interface."""
    from ..serve.generate_runner import cpu_decoder_or_generate
    from ..serve.sampling import Sampling

    decoder = cpu_decoder_or_generate(model, pad_id)
    return decoder.generate(ids, Sampling(max_new_tokens=budget), eos_ids=stop, attention_mask=mask)


def generated_tokens(model, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """The tokens `model.generate` produced, without what it was given: a decoder-only model's output
    starts with the (padded) prompt; an encoder-decoder's is the decoder's sequence, which starts with
    one decoder_start_token_id (the prompt went to the encoder and is not echoed)."""
    from ..checkpoint.architecture import is_encoder_decoder

    return output[:, 1:] if is_encoder_decoder(model.config) else output[:, prompt_width:]


def exact_match_accuracy(model, tokenizer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                         batch_size: int = 8, max_new_tokens: int | None = None) -> float:
    """Share of (prompt ids, target ids) pairs whose greedy reply matches the target (`reply_matches`).
    Prompts are generated in left-padded batches (nf4tune's CPU decoder where it applies); each generates at
    most its target's length + 1 tokens."""
    if not pairs:
        return 0.0
    stop = end_of_turn_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    was_training = model.training
    model.eval()
    hits = 0
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = [pairs[i] for i in order[start:start + batch_size]]
                targets = [trim_at_end_of_turn(t, stop) for _, t in rows]
                budget = max(len(t) for t in targets) + 1
                if max_new_tokens is not None:
                    budget = min(budget, max_new_tokens)
                width = max(len(p) for p, _ in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, (p, _) in enumerate(rows):
                    ids[r, width - len(p):] = torch.tensor(list(p))
                    mask[r, width - len(p):] = 1
                replies = _greedy(model, ids, mask, budget, stop, pad_id)
                for reply, (_, target) in zip(replies, rows):
                    hits += reply_matches(reply, target, stop)
    finally:
        model.train(was_training)
    return hits / len(pairs)
