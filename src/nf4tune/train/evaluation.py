"""Evaluation during training: the held-out loss and exact match, each rank taking its share."""

from __future__ import annotations

import math

import torch

from .data import IGNORE_INDEX, Tokenized, collate


def eval_batches(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range | None]:
    """This rank's share of the evaluation, as ranges of example indices: one process's batches (runs of
    `batch_size` consecutive examples) dealt round-robin, so the ranks' sums are one process's sums.
    Every rank gets the same number of entries, None standing for a padding forward whose result is
    discarded: under FSDP each forward is a collective, so no rank may call it fewer times."""
    starts = range(0, count, batch_size)
    mine = [range(s, min(s + batch_size, count)) for s in starts[rank::world_size]]
    return mine + [None] * (math.ceil(len(starts) / world_size) - len(mine))


def evaluate(loss_fn, model, examples: list[Tokenized], batch_size: int, pad_id: int, par=None) -> float:
    """Mean token loss over `examples`; `loss_fn(batch)` is (sum of token losses, count). With `par`
    (a `train.parallel.Parallel`), each rank evaluates its `eval_batches` and the sums are all-reduced."""
    rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in eval_batches(len(examples), batch_size, rank, world):
            chosen = examples[rows.start:rows.stop] if rows is not None else examples[:1]  # padding: discarded
            batch = {k: v.to(model.device) for k, v in collate(chosen, pad_id).items()}
            s, n = loss_fn(batch)
            if rows is not None:
                total, count = total + float(s), count + n
    model.train(was_training)
    if par is not None:
        total, count = par.sums([total, count])
    return total / max(1, count)


def exact_match(model, tokenizer, examples: list[Tokenized], batch_size: int = 8, par=None) -> float:
    """Share of held-out examples whose greedy reply equals the target reply, both ended at the
    end-of-turn token (the chat template's text after it does not count), decoded in batches. With
    `par`, each rank generates for its `eval_batches` of one process's batches and the hits are
    all-reduced (generation runs on this rank's whole model: not under FSDP)."""
    from ..evaluate.exact_match import exact_match_accuracy

    pairs = [_prompt_and_reply(e) for e in examples]
    if par is None or par.world_size == 1:
        return exact_match_accuracy(model, tokenizer, pairs, batch_size=batch_size)
    # exact_match_accuracy batches the pairs in order of prompt length (a stable sort): the same order
    # here, dealt by batches, gives each rank some of one process's batches, unchanged.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    mine = [pairs[order[i]] for rows in eval_batches(len(pairs), batch_size, par.rank, par.world_size)
            if rows is not None for i in rows]
    hits = exact_match_accuracy(model, tokenizer, mine, batch_size=batch_size) * len(mine)
    hits, count = par.sums([round(hits), len(mine)])
    return hits / max(1, count)


def _prompt_and_reply(e: Tokenized) -> tuple[list[int], list[int]]:
    """What generation is given and what it should answer: an encoder-decoder's source and target (its
    labels), or a decoder-only example cut where its labels start."""
    if e.seq2seq:
        return e.input_ids, e.labels
    prompt_len = next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))
    return e.input_ids[:prompt_len], e.input_ids[prompt_len:]
