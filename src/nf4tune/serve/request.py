"""`Request`: one prompt given to the engine, with its settings, and its reply as the engine fills it
in (text, tokens, finish reason or error); its text also arrives piece by piece, as `Delta`s."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import Sampling


class Delta(str):
    """A piece of a reply's text; `logprobs` holds its tokens' entries when the request asked for them."""

    logprobs: list[dict] = []


@dataclass
class Request:
    prompt: str
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()  # the reply ends before the first of these
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest
    strict_length: bool = False  # prompt + max_new_tokens beyond the context: an error (else fewer tokens)
    probe: Callable[[], bool] | None = None  # False once the client is gone (checked at each token)
    deadline: float | None = None  # time.monotonic() past which the reply ends where it is
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    # Filled in by the engine:
    deltas: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def stream(self):
        """Yield text pieces (`Delta`s) as they are generated."""
        while (piece := self.deltas.get()) is not None:
            yield piece

    def wait(self, timeout: float | None = None) -> "Request":
        self.done.wait(timeout)
        return self

    def cancel(self) -> None:
        """Drop the request: nobody wants its reply any more (it ends at its next token)."""
        self.cancelled = True

    def abandoned(self) -> bool:
        """Whether the request was cancelled or its client went away."""
        if not self.cancelled and self.probe is not None and not self.probe():
            self.cancelled = True
        return self.cancelled

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline
