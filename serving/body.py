"""A request body as a JSON object: bad bytes, bad JSON, NaN, huge or deeply nested values
and lone surrogates are a 400, never a 500."""

from __future__ import annotations

import json
import math
from typing import Any

from serving.errors import bad_request


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number out of range: {text[:40]}")
    return x


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"Request body is not valid UTF-8: {e.reason} at byte {e.start}") from e
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise bad_request(f"Request body is not valid JSON: {e.msg} at position {e.pos}") from e
    except RecursionError as e:
        raise bad_request("Request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # NaN / Infinity, a float overflow, an integer of >4300 digits
        raise bad_request(f"Request body is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(body, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(body).__name__}")
    _check_strings(body)
    return body


def _check_strings(body: dict) -> None:
    """Reject lone surrogates (JSON "\\ud800" escapes): they are not text and cannot be
    tokenized or encoded back to UTF-8. Iterative, so depth is never a problem."""
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(
                    "Request body contains an invalid \\u escape (a lone surrogate)"
                ) from None
