"""The generation engine: one 4-bit base, several adapters, requests batched and streamed.

Requests wait in a bounded queue; a worker thread takes the oldest and, with it, every waiting
request that uses the same adapter and sampling settings (up to `max_batch`), generates them as one
left-padded batch with the KV cache (through `decoder.Decoder` where the model allows, else
transformers' `generate`), and streams each request's text as its tokens arrive. A full queue
refuses new requests at once (the server answers 429) instead of running out of memory.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..errors import Nf4tuneError
from ..models.adapters import AdapterBank
from .decoder import Decoder
from .sampling import Sampling

GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


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


@dataclass
class Request:
    prompt: str
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    # Filled in by the engine:
    deltas: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def stream(self):
        """Yield text pieces as they are generated."""
        while (piece := self.deltas.get()) is not None:
            yield piece

    def wait(self, timeout: float | None = None) -> "Request":
        self.done.wait(timeout)
        return self


class _BatchStreamer(BaseStreamer):
    """Routes the tokens generate() produces for a batch to each request, as text.

    Text is decoded incrementally (as text-generation-inference does): each new token's text is the
    decode of a short window ending in it minus the decode of the window without it, so a step costs
    the same at token 10 as at token 2000; a window ending inside a multi-byte character waits for
    the rest of its bytes."""

    def __init__(self, engine: "Engine", requests: list[Request]):
        self.engine, self.requests = engine, requests
        self.ids: list[list[int]] = [[] for _ in requests]
        self.windows = [(0, 0)] * len(requests)  # per row: where the window starts, where its new tokens start
        self.finished = [False] * len(requests)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompts
            self.prompt_seen = True
            return
        if self.engine.closed:  # stop mid-reply: the process is leaving (Ctrl-C, shutdown)
            raise Nf4tuneError("the engine was closed during generation.")
        eos, decode = self.engine.eos_ids, self.engine.tokenizer.decode
        for row, token in enumerate(value.view(-1).tolist()):
            request, ids = self.requests[row], self.ids[row]
            if self.finished[row]:
                continue
            if token in eos:
                self.finished[row], request.finish_reason = True, "stop"
                continue
            ids.append(token)
            request.completion_tokens = len(ids)
            start, new = self.windows[row]
            before = decode(ids[start:new], skip_special_tokens=True)
            after = decode(ids[start:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                delta = after[len(before):]
                self.windows[row] = (new, len(ids))
                request.text += delta
                request.deltas.put(delta)
            if len(ids) >= request.sampling.max_new_tokens:
                self.finished[row], request.finish_reason = True, "length"

    def end(self) -> None:
        for row, request in enumerate(self.requests):
            request.completion_tokens = len(self.ids[row])
            request.finish_reason = request.finish_reason or "length"


class Engine:
    """Generation for one model with optional named adapters, batched on a worker thread."""

    def __init__(self, model, tokenizer, adapters: dict[str, str] | None = None, max_batch: int = 8,
                 max_queue: int = 64):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.bank = AdapterBank(model, adapters or {}) if adapters else None
        # the lean CPU decoder where the model allows, else generate()
        self.decoder = Decoder(model) if Decoder.unsupported(model) is None else None
        self.max_batch, self.max_queue = max_batch, max_queue
        if max_batch < 1 or max_queue < 1:  # [:0] of the queue would never answer
            raise Nf4tuneError(f"max_batch and max_queue must be 1 or more, got {max_batch} and {max_queue}.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self.gate = threading.Event()  # cleared, the worker holds back (tests use it to fill the queue)
        self.gate.set()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="nf4tune-engine", daemon=True)
        self._worker.start()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank else []

    def submit(self, request: Request) -> Request:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting."""
        request.sampling.check()
        if not request.prompt:
            raise Nf4tuneError("the prompt is empty; give the model some text to continue.")
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise Nf4tuneError(f"no adapter named {request.adapter!r}.")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server has {len(self._waiting)} requests waiting; retry shortly.")
            self._waiting.append(request)
            self._lock.notify()
        return request

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
        with self._lock:
            while not self._waiting and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return []
            first = self._waiting[0]
            batch = [r for r in self._waiting if (r.adapter, r.sampling) == (first.adapter, first.sampling)][: self.max_batch]
            for r in batch:
                self._waiting.remove(r)
            return batch

    def _run(self) -> None:
        while True:
            self.gate.wait()
            batch = self._take_batch()
            if not batch:
                return
            try:
                self._generate(batch)
            except Exception as e:  # one bad batch must not take the server down
                for r in batch:
                    r.error = f"generation failed: {str(e).splitlines()[0]}"
            finally:
                for r in batch:
                    r.deltas.put(None)
                    r.done.set()

    @torch.no_grad()
    def _generate(self, batch: list[Request]) -> None:
        if self.bank is not None and self.bank.active != batch[0].adapter:
            self.bank.activate(batch[0].adapter)
        s = batch[0].sampling
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        for r, mask in zip(batch, enc["attention_mask"]):
            r.prompt_tokens = int(mask.sum())
        streamer = _BatchStreamer(self, batch)
        if self.decoder is not None:
            streamer.put(enc["input_ids"])
            self.decoder.generate(enc["input_ids"], s, self.eos_ids, attention_mask=enc["attention_mask"],
                                  on_step=lambda tokens: streamer.put(torch.tensor(tokens)))
            streamer.end()
            return
        if s.seed is not None:
            torch.manual_seed(s.seed)
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=list(self.eos_ids), repetition_penalty=s.repetition_penalty)
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.model.generate(input_ids=enc["input_ids"].to(self.model.device),
                            attention_mask=enc["attention_mask"].to(self.model.device), streamer=streamer, **kwargs)
