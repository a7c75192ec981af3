"""`ApiError`: a request refused, answered as JSON with its 4xx (or 5xx) status, in OpenAI's error
format; `bad` makes the usual one, a 400 that says in one sentence what is wrong."""

from __future__ import annotations

from http import HTTPStatus


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param)
