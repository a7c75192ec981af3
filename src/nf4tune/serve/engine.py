"""The generation engine: one 4-bit base, several adapters, requests batched and streamed.

Requests wait in a bounded queue; a worker thread takes the oldest (up to `max_batch`) and decodes them
as one batch, continuously: requests that come meanwhile join it as others end. Every model is decoded
through one contract, `run(admit, on_step, eos_ids, adapters, on_failed)`, by what
`nf4tune.dispatch.path("decode", ...)` chooses: on CUDA `static_decoder.StaticDecoder` (a static cache,
the step in a CUDA graph), on CPU `decoder.Decoder` (where each row also has its own adapter), and
where the model (or, for the static decoder, several adapters) needs another, falling back (logged,
with the reason) finally to `generate_runner.GenerateRunner`: transformers' `generate`, for the families
nf4tune's decoding step does not cover (mixtures of experts, OLMo 2, T5, ...), where rows that share an
adapter and settings share a call. So `nf4tune.generate`, the CLI and the server reach every model by
the same code. Each request's text streams as its tokens arrive, cut before any of its stop strings
(text that may be the start of one is held back). A request ends at its next token when its client
went away (`Request.cancel` or its `probe`), when its deadline passes (`request_timeout`), or when
the engine closes; a prompt and reply never outgrow the model's context. A full queue refuses new
requests at once (the server answers 429) instead of running out of memory.

One request cannot fail the others. Its sampling settings are checked and normalized before it joins
a batch (`Sampling.check`: a temperature too small to divide by decodes greedily). A row whose prompt
cannot be prefilled, whose next token cannot be drawn or whose text cannot be made ends alone with its
own error, and the others decode on exactly as if it had ended there; where generate's call fails for
several rows, each goes on alone from the tokens it has (`GenerateRunner`). Each failure is logged
once, with its traceback and its request's id.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from .. import dispatch
from ..errors import Nf4tuneError
from ..models.adapters import AdapterBank
from .batching import Row
from .decoder import Decoder
from .generate_runner import GenerateRunner
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


class Engine:
    """Generation for one model with optional named adapters, batched on a worker thread.

    `request_timeout` (seconds, None: none): a request's reply ends where it is that long after it
    was submitted (finish_reason "length"), so no client holds the worker indefinitely.
    With a worker, the OpenMP team of the thread that makes the engine is let go first: two teams on a CPU of
    few cores slowed each 4-bit matmul of a small model 2.5x on the worker (BENCHMARKS.md). So a caller that
    goes on with parallel PyTorch work of its own beside the worker pays that.
    `worker=False`: no worker thread; `drain()` generates what was submitted in the caller's thread (for a
    caller that waits anyway: one team)."""

    def __init__(self, model, tokenizer, adapters: dict[str, str] | None = None, max_batch: int = 8,
                 max_queue: int = 64, request_timeout: float | None = None, worker: bool = True):
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
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # what prompts are padded with (the caller's tokenizer is left as it is: no pad token is set on it)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids - {None}, default=0))
        self.decoder, self.decode_path = self._choose_decoder(model)
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self.gate = threading.Event()  # cleared, the worker holds back (tests use it to fill the queue)
        self.gate.set()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="nf4tune-engine", daemon=True) if worker else None
        if self._worker is not None:
            dispatch.release_cpu_threads()  # the team this thread made loading the model would slow the worker's
            self._worker.start()

    def _choose_decoder(self, model) -> tuple[Decoder | StaticDecoder | GenerateRunner, dispatch.Path]:
        """What requests are decoded by (a decoder, or `GenerateRunner`: transformers' generate) and the path
        that is, as `dispatch.path("decode", ...)` chooses, falling back (logged, with the reason) where it
        cannot. All three have one `run` contract, so nothing past this choice depends on it."""
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
        return GenerateRunner(model, self.pad_id), dispatch.Path(dispatch.REFERENCE, why)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank else []

    def submit(self, request: Request) -> Request:
        """Check and queue a request; raises Nf4tuneError for a bad one (ContextTooLong beyond the
        model's context) and QueueFull when `max_queue` requests are already waiting."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Check every request, then queue them together, so that they start in one batch (one prefill)
        rather than the first alone and the rest a step later. Raises as `submit` for the first bad one,
        queueing none."""
        for request in requests:
            self._check(request)
        with self._lock:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the server has {len(self._waiting)} requests waiting; retry shortly.")
            self._waiting.extend(requests)
            self._lock.notify()
        return requests

    def _check(self, request: Request) -> None:
        """Validate and tokenize a request in place (see `submit`)."""
        request.sampling = request.sampling.check()  # normalized: a degenerate temperature decodes greedily
        if not request.prompt:
            raise Nf4tuneError("the prompt is empty; give the model some text to continue.")
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise Nf4tuneError(f"no adapter named {request.adapter!r}.")
        request.stop = tuple(request.stop)
        if len(request.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in request.stop):
            raise Nf4tuneError(f"'stop' takes up to {MAX_STOPS} non-empty strings.")
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
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def _take_batch(self) -> list[Request]:
        """The oldest waiting requests (up to max_batch). Requests whose clients left while waiting end here."""
        with self._lock:
            while True:
                while not self._waiting and not self._stopped:
                    # woken at least twice a second: on the main thread (`serve_forever`), Python runs a signal's
                    # handler (Ctrl-C) only between bytecodes, and the signal may have reached another thread
                    self._lock.wait(0.5)
                if self._stopped:
                    return []
                for r in [r for r in self._waiting if r.abandoned() or r.expired()]:
                    self._waiting.remove(r)
                    r.finish_reason = "cancelled" if r.cancelled else "length"
                    self._end(r)
                if self._waiting:
                    break
            batch, self._waiting[:] = self._waiting[: self.max_batch], self._waiting[self.max_batch:]
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
            self._serve(batch)

    def serve_forever(self) -> None:
        """Generate requests as they come, in the calling thread, until `close()` (an engine made with
        worker=False, whose requests other threads submit: `nf4tune serve` decodes on its main thread)."""
        if self._worker is not None:
            raise Nf4tuneError("this engine generates on its worker thread; serve_forever() is for Engine(worker=False).")
        self._run()

    def drain(self) -> None:
        """Generate every submitted request in the calling thread, returning when none is left (an engine
        made with worker=False; requests that join while a batch decodes are admitted into it)."""
        if self._worker is not None:
            raise Nf4tuneError("this engine generates on its worker thread; drain() is for Engine(worker=False).")
        while True:
            with self._lock:
                if self._stopped or not self._waiting:
                    return
            self._serve(self._take_batch())

    def _serve(self, batch: list[Request]) -> None:
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
    def _generate(self, batch: list[Request]) -> None:
        """Decode `batch` through the chosen decoder's `run`, continuously: requests that come while
        others decode join the batch (the decoders' at the next step, in the places of those that ended;
        generate's at its next call); each ends (and is answered) at its own last token."""
        streamer, pending, rows = BatchStreamer(self), list(batch), []

        def admit(live: int) -> list[Row]:
            new = []
            for r in self._admit(pending, live):
                try:
                    new.append(Row(r.prompt_ids, r.sampling, r.adapter, tag=ReplyRow(r), label=r.id))
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
            return
        for row in rows:  # a row its decoder left without a last token ends at the length it has
            if not row.tag.finished:
                streamer.finish(row.tag, "length")
                self._end(row.tag.request)
