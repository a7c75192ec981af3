"""Strict JSON for request bodies, against hostile clients: a body must be JSON an int64, a float
and UTF-8 can hold, nested at most MAX_JSON_DEPTH deep, else a 400 that says in one sentence which.
(Python's json module takes NaN, integers of any length and lone surrogates, and recurses without limit.)
"""

from __future__ import annotations

import json
import math
import re

from .api_error import bad

INT64 = (-(2 ** 63), 2 ** 63 - 1)
MAX_JSON_DEPTH = 64  # an OpenAI request nests about 5 deep; deeper is an attack on the parser
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str):
    raise bad(f"the request body holds {name}, which JSON does not allow; send a finite number.")


def _int64(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 19 or not INT64[0] <= int(text) <= INT64[1]:  # the length first: int() of 5000 digits is slow
        raise bad(f"the request body holds an integer of {len(digits)} digits, beyond the 64-bit range.")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise bad(f"the request body holds the number {text[:40]}, beyond the range of a 64-bit float.")
    return value


def parse_body(data: bytes):
    """The request body as JSON, or a 400 that says in one sentence why not: not JSON, NaN or Infinity,
    an integer beyond int64 or a number beyond float64, a lone UTF-16 surrogate in a string (not
    Unicode, so no tokenizer can encode it), or nesting deeper than MAX_JSON_DEPTH."""
    try:
        body = json.loads(data or b"null", parse_constant=_reject_constant, parse_int=_int64, parse_float=_float)
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}).") from e
    _check_tree(body)
    return body


def _check_tree(body) -> None:
    """Refuse a parsed body nested deeper than MAX_JSON_DEPTH, or with a lone surrogate in a string."""
    stack = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad("the request body holds a string with a lone UTF-16 surrogate (such as \\ud800), which is "
                          "not Unicode text.")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels.")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
