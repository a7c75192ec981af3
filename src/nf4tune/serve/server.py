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
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import queue
import select
import socket
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import Nf4tuneError
from .engine import Engine, QueueFull, Request, render_chat
from .sampling import Sampling

PAGE = Path(__file__).with_name("chat.html")
log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_DRAINED = 16 << 20  # a body over MAX_BODY up to this size is read and dropped; beyond, the connection closes
MAX_CHOICES = 8
INT64 = (-(2 ** 63), 2 ** 63 - 1)

# The parameters each route understands; any other with a value is refused by name.
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
           "seed", "stop", "n", "logprobs", "frequency_penalty", "presence_penalty", "user"}
CHAT_PARAMETERS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_PARAMETERS = _COMMON | {"prompt", "echo"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


class Server:
    """The server: `Server(engine, base_name, api_key).serve(host, port)`, or `.start()` in a thread."""

    def __init__(self, engine: Engine, base_name: str = "base", api_key: str | None = None,
                 chat_style: str = "auto", host: str = "127.0.0.1", port: int = 8000):
        self.engine, self.base_name, self.api_key, self.chat_style = engine, base_name, api_key, chat_style
        server = self

        class Handler(_Handler):
            app = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True

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


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param)


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and not float(value).is_integer()):
        raise _bad(f"'{key}' must be a{'n integer' if kind is int else ' finite number'}; got {value!r}.", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(f"'{key}' is {value}; it must be between {low} and {high}.", key)
    return kind(value)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(f"'{key}' must be true or false.", key)
    return bool(value)


def _check_parameters(body: dict, known: set[str]) -> None:
    for key, value in body.items():
        if key not in known and value not in (None, [], {}, "", False):
            raise _bad(f"the parameter '{key}' is not supported by this server.", key)


def _sampling(body: dict, chat: bool) -> tuple[Sampling, bool]:
    """The request's sampling settings, and whether it named its maximum length (then a reply that
    cannot fit in the context is an error, not a shorter reply)."""
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = Sampling(
        max_new_tokens=_number(body, key, 128, int, 1, INT64[1]),
        temperature=_number(body, "temperature", 0.0, float, 0, 2),
        top_p=_number(body, "top_p", 1.0, float, 1e-6, 1),
        top_k=_number(body, "top_k", 0, int, 0, 100000),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 1e-3, 10),
        seed=_number(body, "seed", None, int, *INT64),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, float, -2, 2),
        presence_penalty=_number(body, "presence_penalty", 0.0, float, -2, 2),
    )
    return sampling, body.get(key) is not None


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
    return tuple(stops)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report (None: no logprobs)."""
    if chat:
        top = _number(body, "top_logprobs", None, int, 0, 20)
        if not _flag(body, "logprobs"):
            if top is not None:
                raise _bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
            return None
        return top or 0
    return _number(body, "logprobs", None, int, 0, 5)


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content: only text parts are supported (got type {part.get('type')!r}).",
                           "messages")
        return "\n".join(p["text"] for p in content)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts.", "messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _bad("'messages' must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.get('role')!r}.", "messages")
        out.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    return out


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


class _Handler(BaseHTTPRequestHandler):
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

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.status.value}})

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.", "invalid_api_key")

    def _read_body(self) -> bytes:
        """The request's body, read whole before any answer, so that the connection stays in step;
        when it cannot be read (no usable length, too large) the connection closes after the answer."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _bad("chunked request bodies are not supported; send a Content-Length.")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        if not raw.strip().isdigit():
            self.close_connection = True
            raise _bad(f"Content-Length must be a non-negative integer; got {raw!r}.")
        length = int(raw)
        if length > MAX_BODY:
            if length <= MAX_DRAINED:
                while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
                    length -= len(chunk)
            else:
                self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes.")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise _bad("the request body ended before its Content-Length.")
        return data

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (checked between tokens without reading)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _handle(self, route) -> None:
        self.request_id = f"req-{uuid.uuid4().hex[:24]}"  # _complete names it after the completion's id
        try:
            route()
        except ApiError as e:
            self._error(e)
        except QueueFull as e:
            self._error(ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(e), "rate_limit_exceeded"))
        except Nf4tuneError as e:
            self._error(ApiError(HTTPStatus.BAD_REQUEST, str(e)))
        except (BrokenPipeError, ConnectionResetError):
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
            self._authorize()
            if self.path == "/v1/chat/completions":
                self._complete(data, chat=True)
            elif self.path == "/v1/completions":
                self._complete(data, chat=False)
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.path}.", "not_found")

        self._handle(route)

    def _complete(self, data: bytes, chat: bool) -> None:
        try:
            body = json.loads(data or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON ({e}).") from e
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object.")
        _check_parameters(body, CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS)
        model = body.get("model") or self.app.base_name
        if not isinstance(model, str):
            raise _bad("'model' must be a string.", "model")
        adapter = self.app.adapter_for(model)
        if chat:
            prompt = render_chat(self.app.engine.tokenizer, _messages(body), self.app.chat_style)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _bad("'prompt' must be a string.", "prompt")
        sampling, strict = _sampling(body, chat)
        stream, echo = _flag(body, "stream"), (not chat and _flag(body, "echo"))
        logprobs = _logprobs(body, chat)
        if echo and logprobs is not None:
            raise _bad("'echo' with 'logprobs' (the prompt's log-probabilities) is not supported.", "echo")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("'stream_options' takes {include_usage: bool}.", "stream_options")
        n = _number(body, "n", 1, int, 1, MAX_CHOICES)
        self.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self.request_id.removeprefix('req-')}"
        requests, shared = [], queue.Queue()
        try:
            for i in range(n):
                seeded = sampling if sampling.seed is None or i == 0 else dataclasses.replace(sampling, seed=sampling.seed + i)
                request = Request(prompt, adapter, seeded, stop=_stops(body), logprobs=logprobs, strict_length=strict,
                                  probe=lambda: not self._client_gone(),
                                  id=self.request_id if i == 0 else f"{self.request_id}-{i}")  # the engine logs these
                request.deltas = _Tagged(shared, i)
                requests.append(self.app.engine.submit(request))
        except Exception:
            for r in requests:
                r.cancel()
            raise
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
