"""`nf4tune.generate`: completions for a list of prompts, in this process, through the same engine as
`nf4tune serve` and `nf4tune chat` (`serve.engine.Engine`), for every family: nf4tune's decoding runtime
where the model's family has it (rows joining a running batch as others finish), transformers' `generate`
otherwise (`serve.generate_runner`: rows that share an adapter and settings share a call). Either way
each prompt has its own adapter, stop strings and length, and a reply is what the prompt gets alone.

    model, tokenizer = nf4tune.load_model("SmolLM2-135M-Instruct", adapter="out/adapter")
    replies = nf4tune.generate(model, tokenizer, ["Name a prime number.", "What is 2 + 2?"], max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import Nf4tuneError
from .sampling import Sampling


@dataclass(frozen=True)
class Completion:
    """One prompt's reply: its text (cut before a stop string), its token count, and why it ended
    ("stop": an end-of-sequence token or a stop string; "length": max_new_tokens or the context)."""

    text: str
    tokens: int
    finish_reason: str


def iter_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] = (), adapter: str | Sequence[str | None] | None = None,
                     adapters: dict[str, str] | None = None, batch_size: int = 8) -> Iterator[Completion]:
    """`generate`'s completions, yielded in the prompts' order as soon as each (and those before it) is
    done (generated on a worker thread meanwhile). Stopping the iteration early (or an interruption) stops
    the generation."""
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    yield from _completions(model, tokenizer, prompts, sampling, stop, adapter, adapters, batch_size, inline=False)


def _completions(model, tokenizer, prompts: Sequence[str], sampling: Sampling, stop: Sequence[str], adapter,
                 adapters: dict[str, str] | None, batch_size: int, inline: bool) -> Iterator[Completion]:
    """The completions through an engine: generated in this thread before the first is yielded (`inline`:
    what `generate` waits for anyway, without a second thread's OpenMP team), else on its worker thread."""
    from .engine import Engine
    from .request import Request

    if isinstance(prompts, str):
        raise Nf4tuneError("prompts must be a list of strings; wrap a single prompt in a list.")
    names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
    if len(names) != len(prompts):
        raise Nf4tuneError(f"{len(names)} adapters named for {len(prompts)} prompts; name one, or one per prompt.")
    if any(name is not None for name in names) and not adapters:
        raise Nf4tuneError("adapter names a LoRA adapter from `adapters` ({name: folder}), which is empty; "
                           "pass adapters=..., or load a single adapter with load_model(adapter=...).")
    engine = Engine(model, tokenizer, adapters, max_batch=batch_size, max_queue=max(1, len(prompts)), worker=not inline)
    try:
        requests = engine.submit_all([Request(p, name, sampling, stop=tuple(stop)) for p, name in zip(prompts, names)])
        if inline:
            engine.drain()
        for request in requests:
            request.wait()
            if request.error:
                raise Nf4tuneError(request.error)
            yield Completion(request.text, request.completion_tokens, request.finish_reason)
    finally:
        engine.close()


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), adapter: str | Sequence[str | None] | None = None,
             adapters: dict[str, str] | None = None, batch_size: int = 8,
             records: bool = False) -> list[str] | list[Completion]:
    """Complete each prompt (text the model continues as given; render chats with the tokenizer's chat
    template first) with `model` (from `nf4tune.load_model`) and return the completions in order.

    Args:
        max_new_tokens: the most tokens per completion (fewer where the model's context ends first).
        temperature: 0 decodes greedily; above it, tokens are drawn (with `top_p`, `top_k`,
            `repetition_penalty`, as transformers' `generate` applies them; `seed` makes draws repeatable).
        stop: up to four strings; a completion ends before the first of them.
        adapter: the name of one of `adapters` for every prompt, or a list naming one (or None: the base)
            per prompt; prompts with different adapters are batched together.
        adapters: LoRA adapters to serve by name, {name: folder} (unmerged, on the same 4-bit base).
        batch_size: how many prompts decode at once.
        records: return `Completion`s (text, tokens, finish_reason) instead of strings.

    The tokenizer is not changed. Raises Nf4tuneError for bad settings or a prompt that fails."""
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    done = list(_completions(model, tokenizer, prompts, sampling, stop, adapter, adapters, batch_size, inline=True))
    return done if records else [c.text for c in done]
