"""The HTTP server's defences against hostile clients: no client can hold a thread forever, and
without an API key no web page can drive the server.

Connections queue in a deep listen backlog (a burst of hundreds is accepted, not reset) and each is
served by its own thread, up to `max_connections` at once; those beyond are answered 503 (JSON,
`Retry-After`) and closed, and beyond twice that closed unanswered (`CappedHTTPServer`). A connection
that sends no request for `idle_timeout` seconds, whose request line and headers (then body) take
more than `read_timeout` seconds to arrive however slowly they trickle in, or that reads nothing of
its answer for `idle_timeout`, is closed. A body is read whole before any answer, up to MAX_BODY
bytes (else 413). Without an API key any web page could drive the server (a cross-site form POST, or
a DNS name rebound to 127.0.0.1): then a request's Host must name this server (localhost, 127.0.0.1,
[::1], the bound host or an `allowed_hosts` name, with its port; else 403), and a POST must say
`Content-Type: application/json` (else 415), which no page can send to another site unasked.
`GuardedHandler` is the request handler that applies all this; the server's handler builds on it.
"""

from __future__ import annotations

import io
import logging
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .api_error import ApiError, bad

log = logging.getLogger("nf4tune.serve.server")  # the server's logger: its connections fail there too

MAX_BODY = 1 << 20
MAX_DRAINED = 16 << 20  # a body over MAX_BODY up to this size is read and dropped; beyond, the connection closes
LISTEN_BACKLOG = 1024  # the kernel caps it (net.core.somaxconn); the standard library's 5 resets bursts
MAX_CONNECTIONS = 256  # served at once, one thread each
IDLE_TIMEOUT = 30.0  # s: no request on a connection (or no progress writing to it)
READ_TIMEOUT = 10.0  # s: a request's line and headers, then its body, must each arrive within this
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_names(host: str, bound: str, allowed) -> frozenset[str]:
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


def host_allowed(header: str | None, hosts: frozenset[str], expected: int) -> bool:
    """Whether a Host header names this server: one of `hosts`, with the port it listens on,
    `expected` (or none, on port 80)."""
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
    return name in hosts and (port == str(expected) or (port is None and expected == 80))


class CappedHTTPServer(ThreadingHTTPServer):
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


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler that reads through the deadlines and has the checks above at hand: the
    server's handler builds on it, and sets `app` (the server: its `api_key`, `hosts`, `address`,
    `idle_timeout` and `read_timeout`)."""

    over_capacity = False  # a connection beyond the server's cap: every request is answered 503

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # read through the deadlines instead
        self.reader = _TimedReader(self.connection, self.app.idle_timeout, self.app.read_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.expect_request()  # idle until the next request's first bytes, then its headers' deadline
        super().handle_one_request()

    def _guard(self) -> None:
        """Without an API key, refuse what a web page could send from another site: a Host that does not
        name this server (a DNS name rebound to it) and a POST that is not `application/json` (a form,
        or fetch's `text/plain`, which need no permission)."""
        if self.app.api_key is not None:
            return
        host = self.headers.get("Host")
        if not host_allowed(host, self.app.hosts, self.app.address[1]):
            raise ApiError(HTTPStatus.FORBIDDEN, f"the Host {host!r:.80} does not name this server; without --api-key it "
                           f"answers only to {', '.join(sorted(self.app.hosts))} (add names with --allow-host).",
                           "permission_error")
        media = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if self.command == "POST" and media != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the body as Content-Type: application/json "
                           f"(got {media or 'none'!r:.60}); without --api-key no other type is accepted.")

    def _read_body(self) -> bytes:
        """The request's body, read whole before any answer, so that the connection stays in step;
        when it cannot be read (no usable length, too large) the connection closes after the answer."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise bad("chunked request bodies are not supported; send a Content-Length.")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        if not raw.strip().isdigit():
            self.close_connection = True
            raise bad(f"Content-Length must be a non-negative integer; got {raw!r}.")
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
            raise bad("the request body ended before its Content-Length.")
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
