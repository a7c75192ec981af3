"""An OpenAI-compatible HTTP server over the engine, on the standard library's threading HTTP server.

GET /v1/models (and /v1/models/{id}), POST /v1/chat/completions and POST /v1/completions, streamed
as server-sent events or not, in OpenAI's wire format; the `model` field picks an adapter (or the
base). Every OpenAI parameter is honoured or refused with a 400 that names it. Errors are JSON with a
4xx status: 400 malformed request, 401 wrong API key, 404 unknown model or path, 413 body too large,
429 full queue; a request's body is always read (or the connection closed), so an error never
leaves a kept-alive connection out of step. A client that goes away (closed socket, failed write)
has its request dropped at the next token; an error during a stream is sent as an error event.

Every answer carries an `x-request-id` header (for a completion, its `id`); a 500, or a stream that
broke off, is logged (logger "nf4tune.serve.server") under that id, with the traceback of a bug in
the server; a generation that failed in the engine has its traceback logged there under the same id.

Hostile clients cannot take it over (`http_guard.py`): connections are capped (503 beyond) and timed
out, and without an API key a request's Host must name this server (else 403) and a POST must be
JSON (else 415). A body must be strict JSON (`json_body.py`); its OpenAI parameters are read and
checked in `params.py`.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import queue
import threading
import uuid
from http import HTTPStatus
from pathlib import Path

from ..errors import Nf4tuneError
from . import params
from .api_error import ApiError, bad
from .engine import Engine, QueueFull, render_chat
from .http_guard import IDLE_TIMEOUT, MAX_CONNECTIONS, READ_TIMEOUT, CappedHTTPServer, GuardedHandler, host_names
from .json_body import parse_body
from .request import Request

PAGE = Path(__file__).with_name("chat.html")
log = logging.getLogger(__name__)

MAX_CHOICES = 8


class Server:
    """The server: `Server(engine, base_name, api_key).start()` serves in a thread (or call
    `.httpd.serve_forever()`); see `http_guard`'s module doc for `max_connections`, `idle_timeout` and
    `read_timeout` (seconds), and for `allowed_hosts`: Host names accepted, besides the loopback
    ones and `host`, when there is no `api_key`."""

    def __init__(self, engine: Engine, base_name: str = "base", api_key: str | None = None,
                 chat_style: str = "auto", host: str = "127.0.0.1", port: int = 8000, *,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, allowed_hosts: tuple[str, ...] | list[str] = ()):
        if max_connections < 1 or not idle_timeout > 0 or not read_timeout > 0:
            raise Nf4tuneError(f"max_connections must be 1 or more and the timeouts over 0; got {max_connections}, "
                               f"{idle_timeout} and {read_timeout}.")
        self.engine, self.base_name, self.api_key, self.chat_style = engine, base_name, api_key, chat_style
        self.idle_timeout, self.read_timeout = idle_timeout, read_timeout
        server = self

        class Handler(_Handler):
            app = server

        class Refusal(Handler):
            over_capacity = True

        self.httpd = CappedHTTPServer((host, port), Handler, Refusal, max_connections)
        self.hosts = host_names(host, self.httpd.server_address[0], allowed_hosts)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.httpd.serve_forever, name="nf4tune-http", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()

    def models(self) -> list[str]:
        return [self.base_name] + self.engine.adapter_names

    def adapter_for(self, model: str | None) -> str | None:
        if model in (None, "", self.base_name):
            return None
        if model not in self.engine.adapter_names:
            raise ApiError(HTTPStatus.NOT_FOUND, f"The model '{model}' does not exist; available: {', '.join(self.models())}.",
                           "model_not_found", "model")
        return model


def _chat_logprobs(entries: list[dict]) -> dict:
    def item(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}

    return {"content": [{**item(e), "top_logprobs": [item(t) for t in e["top_logprobs"]]} for e in entries]}


def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class _Tagged:
    """A request's delta queue that forwards into one queue shared by a request's choices, tagged."""

    def __init__(self, shared: queue.Queue, index: int):
        self.shared, self.index = shared, index

    def put(self, item) -> None:
        self.shared.put((self.index, item))


class _Handler(GuardedHandler):
    app: Server
    protocol_version = "HTTP/1.1"
    request_id: str | None = None  # the request being answered: sent as x-request-id, named in the log

    def log_message(self, fmt, *args):  # quiet: one line per request is left to the caller's logging
        pass

    def end_headers(self) -> None:
        if self.request_id is not None:  # every answer, errors included, can be matched with the log
            self.send_header("x-request-id", self.request_id)
        super().end_headers()

    # --- plumbing ---------------------------------------------------------------------------

    def _send_json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        retry = {"Retry-After": "1"} if e.status in (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS) else {}
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.status.value}},
                        retry)

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.", "invalid_api_key")

    def _handle(self, route) -> None:
        self.request_id = f"req-{uuid.uuid4().hex[:24]}"  # _complete names it after the completion's id
        try:
            if self.over_capacity:
                self._refuse()
            route()
        except ApiError as e:
            self._error(e)
        except QueueFull as e:
            self._error(ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(e), "rate_limit_exceeded"))
        except Nf4tuneError as e:
            self._error(ApiError(HTTPStatus.BAD_REQUEST, str(e)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # gone, or reads nothing of its answer
            self.close_connection = True
        except Exception as e:  # a bug answers 500 with a sentence; the traceback goes to the log
            log.exception("nf4tune: %s %s (request %s) answered 500: internal error: %s", self.command, self.path,
                          self.request_id, e)
            self.close_connection = True
            try:
                self._error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {e}", "server_error"))
            except OSError:
                pass
        finally:
            self.request_id = None  # a kept-alive connection's next answer is another request's

    def _log_failure(self, what: str) -> None:
        """Log a request that the engine failed, once: the engine logged the cause (with its traceback)
        under the same id, in the worker thread where it happened."""
        log.error("nf4tune: %s %s (request %s) %s; the engine logged the cause under this id.", self.command,
                  self.path, self.request_id, what)

    # --- routes -----------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802
        def route():
            self._read_body()
            self._guard()
            if self.path in ("/", "/index.html"):
                page = PAGE.read_bytes()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            self._authorize()
            if self.path == "/v1/models":
                self._send_json(HTTPStatus.OK, {"object": "list", "data": [self._model(m) for m in self.app.models()]})
                return
            if self.path.startswith("/v1/models/"):
                name = self.path.removeprefix("/v1/models/")
                self.app.adapter_for(name)  # 404 for an unknown one
                self._send_json(HTTPStatus.OK, self._model(name or self.app.base_name))
                return
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.path}.", "not_found")

        self._handle(route)

    @staticmethod
    def _model(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nf4tune"}

    def do_POST(self):  # noqa: N802
        def route():
            data = self._read_body()
            self._guard()
            self._authorize()
            if self.path == "/v1/chat/completions":
                self._complete(data, chat=True)
            elif self.path == "/v1/completions":
                self._complete(data, chat=False)
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.path}.", "not_found")

        self._handle(route)

    def _complete(self, data: bytes, chat: bool) -> None:
        body = parse_body(data)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object.")
        params.check_parameters(body, params.CHAT_PARAMETERS if chat else params.COMPLETION_PARAMETERS)
        model = body.get("model") or self.app.base_name
        if not isinstance(model, str):
            raise bad("'model' must be a string.", "model")
        adapter = self.app.adapter_for(model)
        if chat:
            prompt = render_chat(self.app.engine.tokenizer, params.messages(body), self.app.chat_style)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise bad("'prompt' must be a string.", "prompt")
        sampling, strict = params.sampling(body, chat)
        stream, echo = params.flag(body, "stream"), (not chat and params.flag(body, "echo"))
        logprobs = params.logprobs(body, chat)
        if echo and logprobs is not None:
            raise bad("'echo' with 'logprobs' (the prompt's log-probabilities) is not supported.", "echo")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("'stream_options' takes {include_usage: bool}.", "stream_options")
        n = params.number(body, "n", 1, int, 1, MAX_CHOICES)
        self.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self.request_id.removeprefix('req-')}"
        requests, shared = [], queue.Queue()
        for i in range(n):
            seeded = sampling if sampling.seed is None or i == 0 else dataclasses.replace(sampling, seed=sampling.seed + i)
            request = Request(prompt, adapter, seeded, stop=params.stops(body), logprobs=logprobs, strict_length=strict,
                              probe=lambda: not self._client_gone(),
                              id=self.request_id if i == 0 else f"{self.request_id}-{i}")  # the engine logs these
            request.deltas = _Tagged(shared, i)
            requests.append(request)
        self.app.engine.submit_all(requests)  # the n choices start together, or (a bad request) none is queued
        first = requests[0]
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": self.request_id, "created": first.created, "model": model}
        usage = lambda: {"prompt_tokens": first.prompt_tokens,  # noqa: E731
                         "completion_tokens": sum(r.completion_tokens for r in requests),
                         "total_tokens": first.prompt_tokens + sum(r.completion_tokens for r in requests)}
        if stream:
            self._stream(requests, shared, head, chat, echo and prompt, bool(options.get("include_usage")), usage)
            return
        for r in requests:  # the worker drops them at their next token if the client leaves
            r.wait()
        failed = next((r.error for r in requests if r.error), None)
        if failed:
            self._log_failure(f"answered 500: {failed}")
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, failed, "server_error")
        choices = []
        for i, r in enumerate(requests):
            text = (prompt if echo else "") + r.text
            reason = "length" if r.finish_reason == "cancelled" else r.finish_reason
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                                "logprobs": _chat_logprobs(r.token_logprobs) if logprobs is not None else None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason,
                                "logprobs": _completion_logprobs(r.token_logprobs, 0) if logprobs is not None else None})
        self._send_json(HTTPStatus.OK, {**head, "object": kind, "choices": choices, "usage": usage()})

    def _stream(self, requests: list[Request], shared: queue.Queue, head: dict, chat: bool, echo: str,
                include_usage: bool, usage) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        offsets = [len(echo or "")] * len(requests)

        def send(payload: dict) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        def choice(i: int, piece: str | None, entries=None, reason=None) -> None:
            if chat:
                delta = {} if piece is None else {"content": piece}
                c = {"index": i, "delta": delta, "finish_reason": reason,
                     "logprobs": _chat_logprobs(entries) if entries is not None else None}
            else:
                c = {"index": i, "text": piece or "", "finish_reason": reason,
                     "logprobs": _completion_logprobs(entries, offsets[i]) if entries is not None else None}
                offsets[i] += len(piece or "")
            send({**head, "object": chunk_kind, "choices": [c], **({"usage": None} if include_usage else {})})

        try:
            for i in range(len(requests)):
                if chat:
                    send({**head, "object": chunk_kind, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                elif echo:
                    choice(i, echo)
            open_choices = len(requests)
            while open_choices:
                i, piece = shared.get()
                request = requests[i]
                if piece is None:
                    open_choices -= 1
                    if request.error is None:
                        reason = "length" if request.finish_reason == "cancelled" else request.finish_reason
                        choice(i, None, [] if request.logprobs is not None else None, reason)
                    continue
                choice(i, piece, piece.logprobs if request.logprobs is not None else None)
            failed = next((r.error for r in requests if r.error), None)
            if failed:  # the client must see that the reply broke off, not an empty success
                self._log_failure(f"stream broke off with an error event: {failed}")
                send({"error": {"message": failed, "type": "server_error", "param": None, "code": 500}})
            elif include_usage:
                send({**head, "object": chunk_kind, "choices": [], "usage": usage()})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            for r in requests:  # a failed write: the client is gone, its requests cost nothing more
                if not r.done.is_set():
                    r.cancel()
