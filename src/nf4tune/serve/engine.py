"""The generation engine: one 4-bit base, several adapters, requests batched and streamed.

Requests wait in a bounded queue; a worker thread takes the oldest (up to `max_batch`) and generates
them as one batch with the KV cache. The decoder is `nf4tune.dispatch.path("decode", ...)`'s choice:
on CUDA `static_decoder.StaticDecoder` (a static cache, the step in a CUDA graph), on CPU
`decoder.Decoder` (where each row also has its own adapter); with either, requests join a running batch
and each row has its own sampling settings. Where the model (or, for the static decoder, several
adapters) needs another, the engine falls back, logging why, finally to transformers' `generate`, where
a batch shares its adapter and settings. Each request's text streams as its tokens arrive, cut before
any of its stop strings (text that may be the start of one is held back). A request ends at its next token when its client
went away (`Request.cancel` or its `probe`), when its deadline passes (`request_timeout`), or when
the engine closes; a prompt and reply never outgrow the model's context. A full queue refuses new
requests at once (the server answers 429) instead of running out of memory.

One request cannot fail the others. Its sampling settings are checked and normalized before it joins
a batch (`Sampling.check`: a temperature too small to divide by decodes greedily). With the decoders,
a row whose prompt cannot be prefilled, whose next token cannot be drawn or whose text cannot be made
ends alone with its own error, and the others decode on exactly as if it had ended there. With
`generate`, where a batch shares one call: a row whose text fails ends alone (generate is told it
stopped); when the call itself fails for a batch of several, which row caused it cannot be told, so
each unfinished row goes on alone from the tokens it has (its reply continues where it was; a sampled
one draws from its seed anew), and only a row that fails alone is answered with the error. Each
failure is logged once, with its traceback and its request's id.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from .. import dispatch
from ..errors import Nf4tuneError
from ..models.adapters import AdapterBank
from .decoder import Decoder, Row
from .request import Request
from .sampling import Sampling
from .static_decoder import StaticDecoder, round_capacity
from .streaming import BatchStreamer, ReplyRow

log = logging.getLogger(__name__)

GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MAX_STOPS = 4


def render_chat(tokenizer, messages: list[dict], style: str = "auto") -> str:
    """The prompt for `messages`: the tokenizer's chat template, or the Guanaco format
    ("### Human: ... ### Assistant:") that QLoRA's OASST1 adapters were trained on."""
    if style == "auto":
        style = "template" if getattr(tokenizer, "chat_template", None) else "guanaco"
    if style == "template":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = next((m["content"] for m in messages if m["role"] == "system"), GUANACO_SYSTEM)
    turns = "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                    for m in messages if m["role"] in ("user", "assistant"))
    return f"{system}{turns}### Assistant:"


class QueueFull(Nf4tuneError):
    """The engine has as many requests waiting as it accepts."""


class ContextTooLong(Nf4tuneError):
    """A prompt (or prompt plus the tokens asked for) beyond the model's context."""


class _Stopped(StoppingCriteria):
    """generate()'s view of the rows the streamer has ended (stop strings, clients gone, deadlines)."""

    def __init__(self, streamer: BatchStreamer):
        self.streamer = streamer

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor(self.streamer.finished, device=input_ids.device)


class _ReplyPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the reply (what follows the padded prompts)."""

    def __init__(self, prompt_length: int, sampling: Sampling):
        self.start, self.s = prompt_length, sampling

    def __call__(self, input_ids, scores):
        reply = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - counts * self.s.frequency_penalty - (counts > 0).to(scores.dtype) * self.s.presence_penalty


class _BaseVocabulary:
    """Scores of tokens beyond the first `size` (those an adapter other than the batch's added) at -inf."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size:] = float("-inf")
        return scores


class Engine:
    """Generation for one model with optional named adapters, batched on a worker thread.

    `request_timeout` (seconds, None: none): a request's reply ends where it is that long after it
    was submitted (finish_reason "length"), so no client holds the worker indefinitely."""

    def __init__(self, model, tokenizer, adapters: dict[str, str] | None = None, max_batch: int = 8,
                 max_queue: int = 64, request_timeout: float | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self._encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.bank = AdapterBank(model, adapters or {}) if adapters else None
        # An adapter's added tokens: its tokenizer encodes its prompts and decodes every reply (it decodes
        # the base's ids as the base's does); other prompts are encoded as the base encodes them.
        self._encoders = {None: tokenizer}
        if self.bank is not None and self.bank.tokenizer is not None:
            self._encoders[self.bank._adds_tokens] = self.bank.tokenizer
            self.tokenizer = self.bank.tokenizer
        self.max_batch, self.max_queue, self.request_timeout = max_batch, max_queue, request_timeout
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        if max_batch < 1 or max_queue < 1:  # [:0] of the queue would never answer
            raise Nf4tuneError(f"max_batch and max_queue must be 1 or more, got {max_batch} and {max_queue}.")
        self.decoder, self.decode_path = self._choose_decoder(model)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # what prompts are padded with (the caller's tokenizer is left as it is: no pad token is set on it)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids - {None}, default=0))
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self.gate = threading.Event()  # cleared, the worker holds back (tests use it to fill the queue)
        self.gate.set()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="nf4tune-engine", daemon=True)
        self._worker.start()

    def _choose_decoder(self, model) -> tuple[Decoder | StaticDecoder | None, dispatch.Path]:
        """The decoder requests go through (None: transformers' generate) and the path that is, as
        `dispatch.path("decode", ...)` chooses, falling back (logged, with the reason) where it cannot."""
        chosen = dispatch.path("decode", next(model.parameters()))
        if chosen.static_mode is not None:
            reason = StaticDecoder.unsupported(model)
            if reason is None and self.bank is not None:
                reason = "requests with their own adapters need the CPU decoder or generate"
            if reason is None:
                mode = chosen.static_mode
                log.info("nf4tune: decoding with the static-cache decoder (%s%s): %s", mode,
                         "; the first reply compiles its step" if mode != "eager" else "", chosen.reason)
                capacity = round_capacity(1, self.context_length)  # grows with the requests
                return StaticDecoder(model, self.max_batch, capacity, mode=mode), chosen
            log.warning("nf4tune: the static-cache decoder cannot serve this model (%s); falling back.", reason)
            chosen = dispatch.Path(dispatch.REFERENCE, f"the static-cache decoder cannot serve it: {reason}")
        reason = Decoder.unsupported(model)
        if reason is None:
            return Decoder(model), dispatch.Path(dispatch.NATIVE, "the CPU decoder (serve.decoder)")
        if chosen.name == dispatch.NATIVE:
            log.debug("nf4tune: the CPU decoder cannot serve this model (%s); using transformers' generate.", reason)
        why = chosen.reason if chosen.name == dispatch.REFERENCE else f"the CPU decoder cannot serve it: {reason}"
        return None, dispatch.Path(dispatch.REFERENCE, why)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank else []

    def submit(self, request: Request) -> Request:
        """Check and queue a request; raises Nf4tuneError for a bad one (ContextTooLong beyond the
        model's context) and QueueFull when `max_queue` requests are already waiting."""
        request.sampling = request.sampling.check()  # normalized: a degenerate temperature decodes greedily
        if not request.prompt:
            raise Nf4tuneError("the prompt is empty; give the model some text to continue.")
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise Nf4tuneError(f"no adapter named {request.adapter!r}.")
        request.stop = tuple(request.stop)
        if len(request.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in request.stop):
            raise Nf4tuneError(f"'stop' takes up to {MAX_STOPS} non-empty strings.")
        if request.logprobs is not None and self.decoder is None:
            raise Nf4tuneError("logprobs are available with nf4tune's decoders only; this model is served by generate().")
        encoder = self._encoders.get(request.adapter, self._encoders[None])
        # an encoder-decoder reads the prompt as training fed its encoder, with the tokenizer's own special
        # tokens (T5's eos); a decoder-only model continues the text as given
        request.prompt_ids = encoder(request.prompt, add_special_tokens=self._encoder_decoder).input_ids
        request.prompt_tokens = len(request.prompt_ids)
        if not request.prompt_ids:
            raise Nf4tuneError("the prompt makes no tokens; give the model some text to continue.")
        self._fit_context(request)
        if request.deadline is None and self.request_timeout is not None:
            request.deadline = time.monotonic() + self.request_timeout
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server has {len(self._waiting)} requests waiting; retry shortly.")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def _fit_context(self, request: Request) -> None:
        context, prompt, wanted = self.context_length, request.prompt_tokens, request.sampling.max_new_tokens
        if not context:
            return
        if prompt >= context:
            raise ContextTooLong(f"This model's maximum context length is {context} tokens. However, your prompt "
                                 f"resulted in {prompt} tokens. Please reduce the length of the prompt.")
        if prompt + wanted > context:
            if request.strict_length:
                raise ContextTooLong(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt + wanted} tokens ({prompt} in the prompt, {wanted} in the completion). "
                    "Please reduce the length of the prompt or completion.")
            request.sampling = dataclasses.replace(request.sampling, max_new_tokens=context - prompt)

    def generate(self, prompt: str, adapter: str | None = None, **sampling) -> Request:
        """Submit one prompt and wait for it."""
        return self.submit(Request(prompt, adapter, Sampling(**sampling))).wait()

    @property
    def closed(self) -> bool:
        return self._stopped

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop: the batch being generated ends at its next token, and the worker thread is waited for
        (up to `timeout` s): a process that exits while that thread still runs PyTorch can abort."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self.gate.set()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def _take_batch(self) -> list[Request]:
        """The oldest waiting requests (up to max_batch); without the decoder, those that share the
        first one's adapter and sampling. Requests whose clients left while waiting end here."""
        with self._lock:
            while True:
                while not self._waiting and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return []
                for r in [r for r in self._waiting if r.abandoned() or r.expired()]:
                    self._waiting.remove(r)
                    r.finish_reason = "cancelled" if r.cancelled else "length"
                    self._end(r)
                if self._waiting:
                    break
            first = self._waiting[0]
            batch = [r for r in self._waiting if self.decoder is not None
                     or (r.adapter, r.sampling) == (first.adapter, first.sampling)][: self.max_batch]
            for r in batch:
                self._waiting.remove(r)
            return batch

    @staticmethod
    def _end(request: Request) -> None:
        request.deltas.put(None)
        request.done.set()

    def _run(self) -> None:
        while True:
            self.gate.wait()
            batch = self._take_batch()
            if not batch:
                return
            try:
                self._generate(batch)
            except Exception as e:  # one bad batch must not take the server down
                self._failed(batch, e)
            finally:
                for r in batch:
                    if not r.done.is_set():
                        self._end(r)

    def _failed(self, requests: list[Request], error: Exception) -> None:
        """Mark the unanswered `requests` failed by `error` and end them; log it with its traceback
        and the requests' ids (what the server answers with), unless the engine was closing."""
        unanswered = [r for r in requests if not r.done.is_set()]
        ids = ", ".join(r.id for r in unanswered or requests)
        # logged before the requests end, so the line is in the log by the time their clients hear of it
        if self.closed and isinstance(error, Nf4tuneError):  # the reply broke off on purpose (shutdown, Ctrl-C)
            log.info("nf4tune: generation of request(s) %s stopped: %s", ids, error)
        else:
            log.error("nf4tune: generation failed for request(s) %s: %s", ids, error,
                      exc_info=(type(error), error, error.__traceback__))
        for r in unanswered:
            r.error = f"generation failed: {(str(error).splitlines() or [type(error).__name__])[0]}"
            self._end(r)

    def _padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences' ids, left-padded (B, T), and their attention mask."""
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence):] = 1
        return ids, mask

    def _admit(self, pending: list[Request], live: int) -> list[Request]:
        """Requests to start now beside `live` running ones: `pending` first, then the oldest waiting."""
        room = self.max_batch - live
        if room > 0 and self.gate.is_set():
            with self._lock:
                for r in [r for r in self._waiting if r.abandoned() or r.expired()]:
                    self._waiting.remove(r)
                    r.finish_reason = "cancelled" if r.cancelled else "length"
                    self._end(r)
                taken = self._waiting[: max(0, room - len(pending))]
                del self._waiting[: len(taken)]
            pending.extend(taken)
        admitted, pending[:] = pending[: max(room, 0)], pending[max(room, 0):]
        return admitted

    @torch.no_grad()
    def _continuous(self, batch: list[Request]) -> None:
        """Decode with nf4tune's decoder (the CPU or the static one), continuously: requests that come
        while others decode join the batch at the next step, in the places of those that ended; each
        ends (and is answered) at its own last token."""
        streamer, pending, rows = BatchStreamer(self, []), list(batch), []

        def admit(live: int) -> list[Row]:
            new = []
            for r in self._admit(pending, live):
                try:
                    new.append(Row(r.prompt_ids, r.sampling, r.adapter, tag=ReplyRow(r)))
                except Exception as e:  # its settings: it fails alone
                    self._failed([r], e)
            rows.extend(new)
            return new

        def on_step(live: list[Row | None], tokens: list[int]) -> list[int]:
            if self.closed:  # stop mid-reply: the process is leaving (Ctrl-C, shutdown)
                raise Nf4tuneError("the engine was closed during generation.")
            ended = []
            for place, (row, token) in enumerate(zip(live, tokens)):
                if row is None:
                    continue
                streamer.take(row.tag, token, row.logits)
                if row.done and not row.tag.finished:
                    streamer.finish(row.tag, "length")
                if row.tag.finished:
                    ended.append(place)
                    if not row.tag.request.done.is_set():  # a row that failed alone was answered then
                        self._end(row.tag.request)
            return ended

        def on_failed(row: Row) -> None:  # its prefill or its draw failed: it alone is answered with the error
            row.tag.finished = True
            self._failed([row.tag.request], row.error)

        adapters = self.bank.rows([]) if self.bank is not None else None
        try:
            self.decoder.run(admit, on_step, self.eos_ids, adapters, on_failed)
        except Exception as e:  # the requests admitted meanwhile are not in `batch`: answer them here
            self._failed([row.tag.request for row in rows] + pending, e)

    def _decoder_starts(self, rows: int) -> torch.Tensor | None:
        """For an encoder-decoder model, the (rows, 1) ids its decoder starts from (as generate() would
        choose them: the decoder start token, else BOS); None for a decoder-only model."""
        if not getattr(self.model.config, "is_encoder_decoder", False):
            return None
        config, generation = self.model.config, self.model.generation_config
        start = next((t for t in (generation.decoder_start_token_id, getattr(config, "decoder_start_token_id", None),
                                  generation.bos_token_id, getattr(config, "bos_token_id", None)) if t is not None), None)
        if isinstance(start, list):  # one per batch row is for callers that pick them; one token for all here
            start = start[0] if len(set(start)) == 1 else None
        if start is None:
            raise Nf4tuneError("this encoder-decoder model names no decoder start token (decoder_start_token_id).")
        return torch.full((rows, 1), int(start), dtype=torch.long)

    @torch.no_grad()
    def _generate(self, batch: list[Request]) -> None:
        if self.decoder is not None:
            return self._continuous(batch)
        rows = [ReplyRow(r) for r in batch]
        try:
            self._generate_rows(rows)
        except Exception as e:
            if len(rows) == 1 or self.closed:
                raise
            self._retry_alone(rows, e)

    def _retry_alone(self, rows: list[ReplyRow], error: Exception) -> None:
        """generate() failed for a batch of several rows, and which one caused it cannot be told: the
        rows that had finished are answered, and each other one goes on alone from the tokens it has
        (resumed: the reply continues where it was, never repeated); a row that fails alone fails alone."""
        left = [row for row in rows if not row.finished]
        log.warning("nf4tune: generation failed for the batch of request(s) %s (%s: %s); going on with %s alone.",
                    ", ".join(row.request.id for row in rows), type(error).__name__, error,
                    ", ".join(row.request.id for row in left) or "none of them")
        for row in rows:
            if row.finished and not row.request.done.is_set():
                self._end(row.request)
        for row in left:
            try:
                self._generate_rows([row])
            except Exception as e:
                self._failed([row.request], e)
            else:
                self._end(row.request)

    def _generate_rows(self, rows: list[ReplyRow]) -> None:
        """One transformers generate() call for `rows`, which share their adapter and sampling settings:
        from their prompts, or (a row resumed alone) from its prompt and the tokens it already has."""
        batch = [row.request for row in rows]
        resumed = len(rows[0].ids)  # 0 for a new batch; a resumed row is alone
        encoder_decoder = getattr(self.model.config, "is_encoder_decoder", False)
        ids, mask = self._padded([r.prompt_ids + ([] if encoder_decoder else row.ids) for r, row in zip(batch, rows)])
        decoder_starts = self._decoder_starts(len(batch))
        if decoder_starts is not None and resumed:
            decoder_starts = torch.cat([decoder_starts, torch.tensor([rows[0].ids], dtype=torch.long)], 1)
        # generate() passes the ids it starts from to the streamer (the prompts, or the decoder's start
        # tokens), then each step's tokens; the streamer knows them, so only the reply's tokens count.
        starts = ids if decoder_starts is None else decoder_starts
        streamer = BatchStreamer(self, batch, starts, rows)
        if self.bank is not None and self.bank.active != batch[0].adapter:
            self.bank.activate(batch[0].adapter)
        s = batch[0].sampling
        if s.seed is not None:
            torch.manual_seed(s.seed)
        kwargs = dict(max_new_tokens=s.max_new_tokens - resumed, pad_token_id=self.pad_id,
                      eos_token_id=list(self.eos_ids), repetition_penalty=s.repetition_penalty,
                      stopping_criteria=StoppingCriteriaList([_Stopped(streamer)]))
        if decoder_starts is not None:  # given, so the streamer knows them for certain
            kwargs["decoder_input_ids"] = decoder_starts.to(self.model.device)
        processors = [_ReplyPenalties(starts.shape[1] - resumed, s)] if s.penalizes_reply else []
        if self.bank is not None and self.bank.vocab_size(batch[0].adapter) < self.model.get_input_embeddings().weight.shape[0]:
            processors.append(_BaseVocabulary(self.bank.vocab_size(batch[0].adapter)))  # not another adapter's tokens
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if not s.greedy:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                            streamer=streamer, **kwargs)
        streamer.end()  # generate() ends it too; rows it left open (if any) end at their length
