"""An OpenAI-compatible HTTP server over the engine, on the standard library's threading HTTP server.

GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streamed as server-sent events
or not, in OpenAI's wire format; the `model` field picks an adapter (or the base). Errors are JSON
with a 4xx status: 400 malformed request, 401 wrong API key, 404 unknown model or path, 429 full queue.
"""

from __future__ import annotations

import hmac
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import Nf4tuneError
from .engine import Engine, QueueFull, Request, render_chat
from .sampling import Sampling

PAGE = Path(__file__).with_name("chat.html")
MAX_BODY = 1 << 20


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


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
                           "model_not_found")
        return model


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be a {'integer' if kind is int else 'number'}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' is {value}; it must be between {low} and {high}.")
    return kind(value)


def _sampling(body: dict) -> Sampling:
    return Sampling(
        max_new_tokens=_number(body, "max_tokens", 128, int, 1, 32768),
        temperature=_number(body, "temperature", 0.0, float, 0, 2),
        top_p=_number(body, "top_p", 1.0, float, 1e-6, 1),
        top_k=_number(body, "top_k", 0, int, 0, 100000),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 1e-3, 10),
        seed=_number(body, "seed", None, int) if body.get("seed") is not None else None,
    )


class _Handler(BaseHTTPRequestHandler):
    app: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: one line per request is left to the caller's logging
        pass

    # --- plumbing ---------------------------------------------------------------------------

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status.value}})

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.", "invalid_api_key")

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes.")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON ({e}).") from e
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object.")
        return body

    def _handle(self, route) -> None:
        try:
            route()
        except ApiError as e:
            self._error(e)
        except QueueFull as e:
            self._error(ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(e), "rate_limit_exceeded"))
        except Nf4tuneError as e:
            self._error(ApiError(HTTPStatus.BAD_REQUEST, str(e)))
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- routes -----------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802
        def route():
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
                self._send_json(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "nf4tune"} for m in self.app.models()]})
                return
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.path}.", "not_found")

        self._handle(route)

    def do_POST(self):  # noqa: N802
        def route():
            self._authorize()
            if self.path == "/v1/chat/completions":
                self._complete(chat=True)
            elif self.path == "/v1/completions":
                self._complete(chat=False)
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.path}.", "not_found")

        self._handle(route)

    def _complete(self, chat: bool) -> None:
        body = self._body()
        model = body.get("model") or self.app.base_name
        if not isinstance(model, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, "'model' must be a string.")
        adapter = self.app.adapter_for(model)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise ApiError(HTTPStatus.BAD_REQUEST,
                               "'messages' must be a non-empty list of {role: system|user|assistant, content: string}.")
            prompt = render_chat(self.app.engine.tokenizer, messages, self.app.chat_style)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a string.")
        request = self.app.engine.submit(Request(prompt, adapter, _sampling(body)))
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.id}", "created": request.created, "model": model}
        if body.get("stream"):
            self._stream(request, head, kind, chat)
            return
        request.wait()
        if request.error:
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, request.error, "server_error")
        choice = ({"index": 0, "message": {"role": "assistant", "content": request.text}} if chat
                  else {"index": 0, "text": request.text, "logprobs": None})
        choice["finish_reason"] = request.finish_reason
        self._send_json(HTTPStatus.OK, {**head, "object": kind, "choices": [choice], "usage": {
            "prompt_tokens": request.prompt_tokens, "completion_tokens": request.completion_tokens,
            "total_tokens": request.prompt_tokens + request.completion_tokens}})

    def _stream(self, request: Request, head: dict, kind: str, chat: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def send(choice: dict) -> None:
            self.wfile.write(f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [choice]})}\n\n".encode())
            self.wfile.flush()

        if chat:
            send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        for piece in request.stream():
            send({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                 else {"index": 0, "text": piece, "logprobs": None, "finish_reason": None})
        request.wait()
        send({"index": 0, "delta": {}, "finish_reason": request.finish_reason} if chat
             else {"index": 0, "text": "", "logprobs": None, "finish_reason": request.finish_reason})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
