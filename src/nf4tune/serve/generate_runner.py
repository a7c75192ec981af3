"""`GenerateRunner`: transformers' `generate` behind the decoders' `run` contract, for the models nf4tune's
decoding step does not cover (families without `FamilySpec.decoder` in the registry: the mixtures of
experts, OLMo 2, T5; layers without a fused kernel; a model off the CPU without the static decoder).

The serving engine drives every model through one `run(admit, on_step, eos_ids, adapters, on_failed)`
(`serve.decoder.Decoder.run`'s contract), so `nf4tune.generate`, `nf4tune chat`, `nf4tune generate` and
`nf4tune serve` reach these models by the same code as the others. What differs is inside:

- one `generate` call decodes rows that share their adapter and sampling settings (generate applies one
  of each to its batch; a seeded sampled row goes alone, so its seed gives the same reply every time):
  the rows `admit` hands over wait here, grouped, oldest group first, and new rows join between calls,
  not between steps;
- each step's tokens come from generate's streamer, and `on_step` sees them as it sees the decoders'
  (rows that ended are None); the places it returns end there (generate is told through a stopping
  criterion); each row's `logits` are the head's output for its token (captured from the output
  embedding, the registry's logit transform applied), so requests can have logprobs;
- a row's failure is its own where it can be told: when the call fails for several rows, which one
  caused it cannot be, so each unfinished row goes on alone from the tokens it has (its reply continues
  where it was; a sampled one draws from its seed anew), and only a row that fails alone fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..errors import Nf4tuneError
from ..models.loss import LogitTransform
from .batching import Row, generate_rows
from .decoder import Decoder
from .sampling import Sampling

log = logging.getLogger(__name__)


class _CallerError(Exception):
    """An exception raised by the caller's `on_step` inside generate: the caller's, never a row's."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Stopped(StoppingCriteria):
    """generate()'s view of which rows have ended (their last token, `on_step`'s verdict)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


class _ReplyPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the reply (what follows the padded prompts)."""

    def __init__(self, prompt_length: int, sampling: Sampling):
        self.start, self.s = prompt_length, sampling

    def __call__(self, input_ids, scores):
        reply = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - counts * self.s.frequency_penalty - (counts > 0).to(scores.dtype) * self.s.presence_penalty


class _BaseVocabulary(LogitsProcessor):
    """Scores of tokens beyond the first `size` (those an adapter other than the batch's added) at -inf."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size:] = float("-inf")
        return scores


class _Steps(BaseStreamer):
    """generate()'s streamer: each step's tokens, (B,) or (B, k) for k steps, to `on_tokens`.

    generate() passes the ids it starts from first (transformers 5 does; a version that does not is
    served too): a first put equal to `starts` is recognised by its content and skipped."""

    def __init__(self, starts: torch.Tensor, on_tokens: Callable[[list[int]], None]):
        self.starts, self.on_tokens, self.first = starts.cpu(), on_tokens, True

    def put(self, value: torch.Tensor) -> None:
        first, self.first = self.first, False
        if first and value.dim() == 2 and value.shape == self.starts.shape and torch.equal(value.cpu(), self.starts):
            return
        rows = self.starts.shape[0]
        if value.numel() == 0 or value.numel() % rows:
            raise Nf4tuneError(f"generate passed {tuple(value.shape)} tokens to a batch of {rows} rows.")
        for step in value.reshape(rows, -1).t().tolist():
            self.on_tokens(step)

    def end(self) -> None:
        pass


def padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences' ids, left-padded with `pad_id` (B, T), and their attention mask."""
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, length - len(sequence):] = 1
    return ids, mask


def decoder_starts(model, rows: int) -> torch.Tensor | None:
    """For an encoder-decoder model, the (rows, 1) ids its decoder starts from (as generate() would choose
    them: the decoder start token, else BOS); None for a decoder-only model."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    config, generation = model.config, model.generation_config
    start = next((t for t in (generation.decoder_start_token_id, getattr(config, "decoder_start_token_id", None),
                              generation.bos_token_id, getattr(config, "bos_token_id", None)) if t is not None), None)
    if isinstance(start, list):  # one per batch row is for callers that pick them; one token for all here
        start = start[0] if len(set(start)) == 1 else None
    if start is None:
        raise Nf4tuneError("this encoder-decoder model names no decoder start token (decoder_start_token_id).")
    return torch.full((rows, 1), int(start), dtype=torch.long)


class GenerateRunner:
    """transformers' `generate` for `model`, run as the decoders run (see the module doc); prompts are
    left-padded with `pad_id`.

        runner = GenerateRunner(model, pad_id=0)
        runner.run(admit, on_step, eos_ids={2})
    """

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.transform = LogitTransform.of(model.config)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why the runner cannot decode `model`: never (any model transformers' generate takes)."""
        return None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, sampling: Sampling | Sequence[Sampling], eos_ids: set[int] = frozenset(),
                 attention_mask: torch.Tensor | None = None,
                 on_step: Callable[[list[int]], Iterable[int] | None] | None = None,
                 adapters=None) -> list[list[int]]:
        """`serve.decoder.Decoder.generate`'s contract: up to `max_new_tokens` tokens after each prompt of
        `input_ids` (B, T; left-padded where `attention_mask` has zeros), each row's, `run` over a fixed batch."""
        return generate_rows(self, input_ids, sampling, eos_ids, attention_mask, on_step, adapters)

    @torch.no_grad()
    def run(self, admit: Callable[[int], list[Row]], on_step: Callable[[list[Row | None], list[int]], Iterable[int] | None],
            eos_ids: set[int] = frozenset(), adapters=None, on_failed: Callable[[Row], None] | None = None) -> None:
        """`serve.decoder.Decoder.run`'s contract: `admit(live)` hands over rows (those waiting here count as
        live), each group of rows sharing an adapter and settings decodes in one generate call, oldest
        first; `on_step(rows, tokens)` sees each step and returns the places that end there. `adapters`
        (`AdapterBank.rows([])`): each call switches in its group's adapter. `on_failed(row)`: a row that
        fails alone (without it, the failure is raised). An exception from `on_step` ends the run."""
        waiting: list[Row] = []
        while True:
            waiting.extend(admit(len(waiting)))
            if not waiting:
                return
            group = _next_group(waiting)
            waiting[:] = [row for row in waiting if all(row is not r for r in group)]
            self._run_group(group, on_step, eos_ids, adapters, on_failed)

    def _run_group(self, rows: list[Row], on_step, eos_ids: set[int], adapters, on_failed) -> None:
        """One generate call for `rows`; when it fails for several, each unfinished one goes on alone."""
        try:
            self._generate(rows, on_step, eos_ids, adapters)
        except _CallerError as e:
            raise e.error from None
        except Exception as e:
            if len(rows) == 1:
                if on_failed is None:
                    raise
                rows[0].error, rows[0].done = e, True
                on_failed(rows[0])
                return
            left = [row for row in rows if not row.done]
            log.warning("nf4tune: generation failed for the batch of request(s) %s (%s: %s); going on with %s alone.",
                        _names(rows), type(e).__name__, e, _names(left) or "none of them")
            for row in left:
                self._run_group([row], on_step, eos_ids, adapters, on_failed)

    def _generate(self, rows: list[Row], on_step, eos_ids: set[int], adapters) -> None:
        """generate() for `rows`, which share their adapter and settings: from their prompts, or (a row
        resumed alone) from its prompt and the tokens it already has."""
        resumed = len(rows[0].out)  # 0 for a new group; a resumed row is alone
        ids, mask = padded([row.prompt_ids + ([] if self.encoder_decoder else row.out) for row in rows], self.pad_id)
        starts = decoder_starts(self.model, len(rows))
        if starts is not None and resumed:
            starts = torch.cat([starts, torch.tensor([rows[0].out], dtype=torch.long)], 1)
        if adapters is not None and adapters.bank.active != rows[0].adapter:
            adapters.bank.activate(rows[0].adapter)
        s = rows[0].sampling
        if s.seed is not None:
            torch.manual_seed(s.seed)
        kwargs = self._settings(rows, s, eos_ids, adapters, (ids if starts is None else starts).shape[1] - resumed)
        if starts is not None:  # given, so the streamer knows them for certain
            kwargs["decoder_input_ids"] = starts.to(self.model.device)
        logits: list[torch.Tensor] = []  # the head's output for the step's last position

        def keep(module, args, out) -> None:
            logits[:] = [out[:, -1]] if isinstance(out, torch.Tensor) and out.dim() == 3 else []

        vocab = adapters.bank.vocab_size(rows[0].adapter) if adapters is not None else None
        head = self.model.get_output_embeddings()
        hook = head.register_forward_hook(keep) if head is not None else None
        try:
            self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                streamer=_Steps(ids if starts is None else starts,
                                                lambda tokens: self._step(rows, tokens, logits, vocab, on_step, eos_ids)),
                                **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    def _settings(self, rows: list[Row], s: Sampling, eos_ids: set[int], adapters, prompt_width: int) -> dict:
        """generate()'s keyword arguments for a group under settings `s`."""
        kwargs = dict(max_new_tokens=max(row.remaining for row in rows), pad_token_id=self.pad_id,
                      eos_token_id=list(eos_ids), repetition_penalty=s.repetition_penalty,
                      stopping_criteria=StoppingCriteriaList([_Stopped(rows)]))
        processors = [_ReplyPenalties(prompt_width, s)] if s.penalizes_reply else []
        if adapters is not None:  # not the tokens another adapter added
            size = adapters.bank.vocab_size(rows[0].adapter)
            if size < self.model.get_input_embeddings().weight.shape[0]:
                processors.append(_BaseVocabulary(size))
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if s.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        return kwargs

    def _step(self, rows: list[Row], tokens: list[int], logits: list[torch.Tensor], vocab: int | None, on_step,
              eos_ids: set[int]) -> None:
        """One step's tokens: each live row takes its own (and its logits over its adapter's vocabulary), as
        `batching.draw` would give them; `on_step` sees the step and says which rows end there."""
        head = self.transform(logits[0].float())[:, :vocab] if logits and len(logits[0]) == len(rows) else None
        live: list[Row | None] = []
        for place, (row, token) in enumerate(zip(rows, tokens)):
            if row.done:  # generate pads the rows that ended
                live.append(None)
                continue
            row.logits = head[place] if head is not None else None
            row.out.append(token)
            row.seen.append(token)
            row.done = token in eos_ids or len(row.out) >= row.sampling.max_new_tokens
            live.append(row)
        try:
            ended = on_step(live, tokens)
        except Exception as e:
            raise _CallerError(e) from e
        for place in ended or ():
            rows[place].done = True


def cpu_decoder_or_generate(model, pad_id: int) -> Decoder | GenerateRunner:
    """nf4tune's CPU decoder where it runs `model`, else `GenerateRunner` (both with `generate` and `run`);
    prompts are left-padded with `pad_id` for generate. (The serving engine chooses among more:
    `Engine._choose_decoder`.)"""
    return Decoder(model) if Decoder.unsupported(model) is None else GenerateRunner(model, pad_id)


def _next_group(waiting: list[Row]) -> list[Row]:
    """The rows of the next generate call: the oldest and those that share its adapter and settings. A
    seeded sampled row goes alone: generate draws a batch's tokens from one generator, so beside others
    its draws would depend on what it was batched with, and a seed must give the same reply every time."""
    first = waiting[0]
    if first.sampling.seed is not None and not first.sampling.greedy:
        return [first]
    return [row for row in waiting if (row.adapter, row.sampling) == (first.adapter, first.sampling)]


def _names(rows: list[Row]) -> str:
    return ", ".join(row.label or "?" for row in rows)
