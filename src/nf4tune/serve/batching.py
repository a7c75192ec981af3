"""The continuous-batching loop of nf4tune's two decoders (`serve.decoder.Decoder` on CPU,
`serve.static_decoder.StaticDecoder` on CUDA), which differ only in how they hold the cache and advance it a
token; the rows that every decoder's `run(admit, on_step, ...)` is handed (`serve.generate_runner.GenerateRunner`'s
too), `generate_rows` (`run` over a fixed batch), and `draw`, the one place a token is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import Sampling, next_token


@dataclass(eq=False)
class Row:
    """One sequence of a continuous batch (`Decoder.run`): its prompt, its settings, what it made."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    tag: Any = None  # the caller's (the engine's request)
    out: list[int] = field(default_factory=list)
    done: bool = False
    logits: torch.Tensor | None = None  # the scores its next token is drawn from
    error: Exception | None = None  # why it failed alone (its prefill or its draw), for `on_failed`
    label: str | None = None  # the caller's name for it in log lines (the engine's request id)

    def __post_init__(self):
        self.seen = list(self.prompt_ids)
        self.generator = None if self.sampling.seed is None else torch.Generator().manual_seed(self.sampling.seed)

    @property
    def remaining(self) -> int:
        return self.sampling.max_new_tokens - len(self.out)


def draw(row: Row, eos_ids: set[int]) -> int:
    """Row `row`'s next token from its logits under its own settings and generator (the one place a
    token is chosen: both decoders' `run`)."""
    s = row.sampling
    penalized = torch.tensor(row.seen) if s.repetition_penalty != 1.0 else None
    token = next_token(row.logits, s, penalized, row.generator, row.out)
    row.out.append(token)
    row.seen.append(token)
    row.done = token in eos_ids or len(row.out) >= s.max_new_tokens
    return token


def generate_rows(decoder, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling], eos_ids: set[int],
                  attention_mask: torch.Tensor | None, on_step: Callable[[list[int]], Iterable[int] | None] | None,
                  adapters=None) -> list[list[int]]:
    """`decoder.run` over the fixed batch of `input_ids` (B, T; left-padded where `attention_mask` has
    zeros): each row's tokens. `on_step` sees each step's tokens, one per row (rows that have stopped
    repeat their last token); the rows it returns stop there."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length); got shape {list(input_ids.shape)}")
    samplings = [sampling] * input_ids.shape[0] if isinstance(sampling, Sampling) else list(sampling)
    if len(samplings) != input_ids.shape[0]:
        raise ValueError(f"{len(samplings)} sampling settings for {input_ids.shape[0]} rows")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    names = adapters.names if adapters is not None else [None] * len(samplings)
    rows = [Row(ids[m.bool()].tolist(), s, name) for ids, m, s, name in zip(input_ids, mask, samplings, names)]
    pending = list(rows)

    def admit(live: int) -> list[Row]:
        new, pending[:] = list(pending), []
        return new

    def step(live: list[Row | None], tokens: list[int]) -> list[int]:
        if on_step is None:
            return []
        ended = {id(rows[i]) for i in on_step([r.out[-1] if r.out else 0 for r in rows]) or ()}
        return [place for place, r in enumerate(live) if r is not None and id(r) in ended]

    decoder.run(admit, step, eos_ids, None if adapters is None else adapters.bank.rows([]))
    return [r.out for r in rows]


def continuous_batching(live: list[Row | None], admit: Callable[[int], list[Row]],
                        on_step: Callable[[list[Row | None], list[int]], Iterable[int] | None], eos_ids: set[int],
                        place_new: Callable[[list[Row]], None], retire: Callable[[int], None],
                        step: Callable[[list[int]], Iterable[tuple[int, torch.Tensor]]],
                        on_failed: Callable[[Row], None] | None = None) -> None:
    """The loop both decoders run (`Decoder.run`, `StaticDecoder.run`); they differ in how they hold the
    cache. Between steps `admit(live count)` hands over rows and `place_new(rows)` puts them in `live`
    with their first logits; every live row draws its next token; `on_step(live, tokens)` returns the
    places that end there, which `retire(place)` frees; `step(tokens)` advances the cache one token
    and returns (place, logits) for each live row. Returns once no row is live and `admit` gives none.

    One row's failure is its own: a row whose prompt cannot be prefilled, or whose next token cannot be
    drawn (its settings or its logits give no distribution), leaves the batch before `on_step` sees the
    step, with the exception in `row.error`, and `on_failed(row)` is told; the other rows go on exactly
    as if it had ended there (each row's arithmetic is its own, so their tokens do not change). Without
    `on_failed` such a failure is raised. A failure of the shared step is every row's, and is raised."""
    def fail(row: Row, error: Exception) -> None:
        if on_failed is None:
            raise error
        row.error, row.done = error, True
        on_failed(row)

    while True:
        new = admit(sum(r is not None for r in live))
        if new:
            _place_each(live, new, place_new, retire, fail)
        if not any(live):
            return
        tokens = []
        for place, row in enumerate(live):
            token = 0
            if row is not None:
                try:
                    token = draw(row, eos_ids)
                except Exception as e:  # this row's settings or logits: it leaves, the others draw on
                    live[place] = None
                    retire(place)
                    fail(row, e)
            tokens.append(token)
        for place in on_step(live, tokens) or ():
            live[place].done = True
        for place, r in enumerate(live):
            if r is not None and r.done:
                live[place] = None
                retire(place)
        if not any(live):
            continue
        for place, logits in step(tokens):
            live[place].logits = logits


def _place_each(live: list[Row | None], new: list[Row], place_new: Callable[[list[Row]], None],
                retire: Callable[[int], None], fail: Callable[[Row, Exception], None]) -> None:
    """`place_new(new)`; when that fails, the new rows leave the places they took and each is placed
    alone, so that a prompt which cannot be prefilled fails its own row only (prefill computes each
    prompt apart, so a row placed alone holds what it would have held placed with the others)."""
    try:
        place_new(new)
        return
    except Exception as e:
        _vacate(live, new, retire)
        if len(new) == 1:
            return fail(new[0], e)
    for row in new:
        try:
            place_new([row])
        except Exception as e:
            _vacate(live, [row], retire)
            fail(row, e)


def _vacate(live: list[Row | None], rows: list[Row], retire: Callable[[int], None]) -> None:
    """Free the places `rows` hold in `live` (a failed placement may have taken some)."""
    for place, r in enumerate(live):
        if r is not None and any(r is row for row in rows):
            live[place] = None
            retire(place)
