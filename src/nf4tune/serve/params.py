"""An OpenAI request's parameters, read from its JSON body into the engine's terms (`Sampling`, stop
strings, logprobs, chat messages). Each is honoured or refused with a 400 that names it; a parameter
this server does not know is refused by name when it has a value."""

from __future__ import annotations

import math

from .api_error import bad
from .json_body import INT64
from .sampling import Sampling

# The parameters each route understands; any other with a value is refused by name.
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
           "seed", "stop", "n", "logprobs", "frequency_penalty", "presence_penalty", "user"}
CHAT_PARAMETERS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_PARAMETERS = _COMMON | {"prompt", "echo"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and (
            not math.isfinite(value) or (kind is int and not value.is_integer()))):
        raise bad(f"'{key}' must be a{'n integer' if kind is int else ' finite number'}; got {value!r:.40}.", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{key}' is {value}; it must be between {low} and {high}.", key)
    return kind(value)


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false.", key)
    return bool(value)


def check_parameters(body: dict, known: set[str]) -> None:
    for key, value in body.items():
        if key not in known and value not in (None, [], {}, "", False):
            raise bad(f"the parameter '{key}' is not supported by this server.", key)


def sampling(body: dict, chat: bool) -> tuple[Sampling, bool]:
    """The request's sampling settings, and whether it named its maximum length (then a reply that
    cannot fit in the context is an error, not a shorter reply)."""
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    settings = Sampling(
        max_new_tokens=number(body, key, 128, int, 1, INT64[1]),
        temperature=number(body, "temperature", 0.0, float, 0, 2),
        top_p=number(body, "top_p", 1.0, float, 1e-6, 1),
        top_k=number(body, "top_k", 0, int, 0, 100000),
        repetition_penalty=number(body, "repetition_penalty", 1.0, float, 1e-3, 10),
        seed=number(body, "seed", None, int, *INT64),
        frequency_penalty=number(body, "frequency_penalty", 0.0, float, -2, 2),
        presence_penalty=number(body, "presence_penalty", 0.0, float, -2, 2),
    )
    return settings, body.get(key) is not None


def stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    given = [stop] if isinstance(stop, str) else stop
    if not isinstance(given, list) or len(given) > 4 or not all(isinstance(s, str) and s for s in given):
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
    return tuple(given)


def logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report (None: no logprobs)."""
    if chat:
        top = number(body, "top_logprobs", None, int, 0, 20)
        if not flag(body, "logprobs"):
            if top is not None:
                raise bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
            return None
        return top or 0
    return number(body, "logprobs", None, int, 0, 5)


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported (got type {part.get('type')!r}).",
                          "messages")
        return "\n".join(p["text"] for p in content)
    raise bad(f"messages[{index}].content must be a string or a list of text parts.", "messages")


def messages(body: dict) -> list[dict]:
    given = body.get("messages")
    if not isinstance(given, list) or not given or not all(isinstance(m, dict) for m in given):
        raise bad("'messages' must be a non-empty list of {role, content}.", "messages")
    out = []
    for i, m in enumerate(given):
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.get('role')!r}.", "messages")
        out.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    return out
