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

Hostile clients cannot take it over. Connections queue in a deep listen backlog (a burst of hundreds
is accepted, not reset) and each is served by its own thread, up to `max_connections` at once; those
beyond are answered 503 (JSON, `Retry-After`) and closed, and beyond twice that closed unanswered. A
connection that sends no request for `idle_timeout` seconds, whose request line and headers (then
body) take more than `read_timeout` seconds to arrive however slowly they trickle in, or that reads
nothing of its answer for `idle_timeout`, is closed: no client holds a thread forever. A body must be
JSON an int64, a float and UTF-8 can hold, nested at most MAX_JSON_DEPTH deep (else a 400 that says
which). Without an API key any web page could drive the server (a cross-site form POST, or a DNS
name rebound to 127.0.0.1): then a request's Host must name this server (localhost, 127.0.0.1,
[::1], the bound host or an `allowed_hosts` name, with its port; else 403), and a POST must say
`Content-Type: application/json` (else 415), which no page can send to another site unasked.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import json
import logging
import math
import queue
import re
import select
import socket
import threading
import time
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
MAX_JSON_DEPTH = 64  # an OpenAI request nests about 5 deep; deeper is an attack on the parser
LISTEN_BACKLOG = 1024  # the kernel caps it (net.core.somaxconn); the standard library's 5 resets bursts
MAX_CONNECTIONS = 256  # served at once, one thread each
IDLE_TIMEOUT = 30.0  # s: no request on a connection (or no progress writing to it)
READ_TIMEOUT = 10.0  # s: a request's line and headers, then its body, must each arrive within this
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_SURROGATE = re.compile("[\ud800-\udfff]")

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
    """The server: `Server(engine, base_name, api_key).start()` serves in a thread (or call
    `.httpd.serve_forever()`); see the module doc for `max_connections`, `idle_timeout` and
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

        self.httpd = _HTTPServer((host, port), Handler, Refusal, max_connections)
        self.hosts = _host_names(host, self.httpd.server_address[0], allowed_hosts)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def host_allowed(self, header: str | None) -> bool:
        """Whether a Host header names this server: one of `self.hosts`, with the port it listens on
        (or none, on port 80)."""
        if not header:
            return False
        header = header.strip().lower()
        if header.startswith("["):  # an IPv6 literal: [::1]:8000
            name, _, rest = header.partition("]")
            name, sep, port = name + "]", rest[:1], rest[1:]
            if rest and sep != ":":
                return False
        else:
            name, sep, port = header.partition(":")
        port = port if sep else None
        expected = self.address[1]
        return name in self.hosts and (port == str(expected) or (port is None and expected == 80))

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


def _host_names(host: str, bound: str, allowed) -> frozenset[str]:
    """The Host names (lower case, IPv6 in brackets) a server bound to `host` (`bound`) answers to
    without an API key: the loopback names, the host and address it listens on, `allowed`, and for a
    server on every interface (0.0.0.0) the machine's own name."""
    names = {*LOOPBACK_NAMES, *(a.strip().lower() for a in allowed)}
    for name in (host, bound):
        if name and name not in ("0.0.0.0", "::"):
            names.add(f"[{name}]" if ":" in name and not name.startswith("[") else name.lower())
    if host in ("", "0.0.0.0", "::"):
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    return frozenset(names)


class _HTTPServer(ThreadingHTTPServer):
    """The standard library's threading HTTP server with a deep listen backlog and a cap on the
    connections served at once: one beyond `max_connections` is served by `refusal` (a 503), one
    beyond twice that is closed at once (answering costs a thread too)."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, address, handler, refusal, max_connections: int):
        self.refusal, self.max_connections = refusal, max_connections
        self.connections = 0  # open, each with its thread
        self._count = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self._count:
            if self.connections >= 2 * self.max_connections:
                self.shutdown_request(request)
                return
            self.connections += 1
            over = self.connections > self.max_connections
        try:
            threading.Thread(target=self._serve, args=(request, client_address, over), daemon=True,
                             name="nf4tune-http-connection").start()
        except RuntimeError:  # no thread to be had: the connection is closed, the server goes on
            self._closed(request)

    def _serve(self, request, client_address, over: bool) -> None:
        try:
            (self.refusal if over else self.RequestHandlerClass)(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._closed(request)

    def _closed(self, request) -> None:
        with self._count:
            self.connections -= 1
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # to the log, not stderr
        log.exception("nf4tune: the connection from %s failed", client_address[0] if client_address else "?")


class _TimedReader(io.RawIOBase):
    """A connection's reading side, with deadlines: waiting for a request's first bytes may take
    `idle` seconds; from them, the rest of its line and headers must arrive within `read` seconds in
    all (`expect_body` starts the same allowance for its body), however slowly they trickle in. Each
    read leaves the socket's timeout at `idle`, which bounds writes to a client that reads nothing."""

    def __init__(self, sock: socket.socket, idle: float, read: float):
        self.sock, self.idle, self.read_allowance = sock, idle, read
        self.deadline: float | None = None  # None: waiting for a request
        sock.settimeout(idle)

    def readable(self) -> bool:
        return True

    def expect_request(self) -> None:
        self.deadline = None

    def expect_body(self) -> None:
        self.deadline = time.monotonic() + self.read_allowance

    def readinto(self, buffer) -> int:
        timeout = self.idle if self.deadline is None else self.deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError(f"the request did not arrive within {self.read_allowance:g} s")
        self.sock.settimeout(timeout)
        try:
            count = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle)
        if self.deadline is None and count:  # a request began: the rest of its headers has `read` seconds
            self.deadline = time.monotonic() + self.read_allowance
        return count


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param)


def _reject_constant(name: str):
    raise _bad(f"the request body holds {name}, which JSON does not allow; send a finite number.")


def _int64(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 19 or not INT64[0] <= int(text) <= INT64[1]:  # the length first: int() of 5000 digits is slow
        raise _bad(f"the request body holds an integer of {len(digits)} digits, beyond the 64-bit range.")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad(f"the request body holds the number {text[:40]}, beyond the range of a 64-bit float.")
    return value


def parse_body(data: bytes):
    """The request body as JSON, or a 400 that says in one sentence why not: not JSON, NaN or Infinity,
    an integer beyond int64 or a number beyond float64, a lone UTF-16 surrogate in a string (not
    Unicode, so no tokenizer can encode it), or nesting deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(data or b"null", parse_constant=_reject_constant, parse_int=_int64, parse_float=_float)
    except RecursionError:
        raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON ({e}).") from e
    _check_tree(body)
    return body


def _check_tree(body) -> None:
    """Refuse a parsed body nested deeper than MAX_JSON_DEPTH, or with a lone surrogate in a string."""
    stack = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _bad("the request body holds a string with a lone UTF-16 surrogate (such as \\ud800), which is "
                           "not Unicode text.")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels.")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and (
            not math.isfinite(value) or (kind is int and not value.is_integer()))):
        raise _bad(f"'{key}' must be a{'n integer' if kind is int else ' finite number'}; got {value!r:.40}.", key)
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
    over_capacity = False  # a connection beyond the server's cap: every request is answered 503

    def log_message(self, fmt, *args):  # quiet: one line per request is left to the caller's logging
        pass

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # read through the deadlines instead
        self.reader = _TimedReader(self.connection, self.app.idle_timeout, self.app.read_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.expect_request()  # idle until the next request's first bytes, then its headers' deadline
        super().handle_one_request()

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

    def _guard(self) -> None:
        """Without an API key, refuse what a web page could send from another site: a Host that does not
        name this server (a DNS name rebound to it) and a POST that is not `application/json` (a form,
        or fetch's `text/plain`, which need no permission)."""
        if self.app.api_key is not None:
            return
        host = self.headers.get("Host")
        if not self.app.host_allowed(host):
            raise ApiError(HTTPStatus.FORBIDDEN, f"the Host {host!r:.80} does not name this server; without --api-key it "
                           f"answers only to {', '.join(sorted(self.app.hosts))} (add names with --allow-host).",
                           "permission_error")
        media = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if self.command == "POST" and media != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the body as Content-Type: application/json "
                           f"(got {media or 'none'!r:.60}); without --api-key no other type is accepted.")

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
        self.reader.expect_body()
        try:
            if length > MAX_BODY:
                if length <= MAX_DRAINED:
                    while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
                        length -= len(chunk)
                else:
                    self.close_connection = True
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes.")
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT,
                           f"the request body did not arrive within {self.app.read_timeout:g} s.") from None
        if len(data) < length:
            self.close_connection = True
            raise _bad("the request body ended before its Content-Length.")
        return data

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (checked between tokens without reading). poll, not
        select: with hundreds of connections a descriptor can pass select's limit of 1024, and a
        ValueError there would take a client that is still waiting for gone."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

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

    def _refuse(self) -> None:
        """Answer 503: the server holds as many connections as it serves. The body is read first (so the
        client gets the answer, not a reset), and the connection closes after it."""
        self.close_connection = True
        try:
            self._read_body()
        except ApiError:
            pass
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"the server is serving its limit of "
                       f"{self.server.max_connections} connections; retry shortly.", "server_error")

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
