"""HTTP errors: the OpenAI / Fireworks error envelope (docs/sampling.md 5.1), and how a
pydantic validation error or an engine refusal becomes one."""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError

from engine.requests import (
    ContextLengthExceeded,
    EngineOverloaded,
    InvalidRequest,
)

RETRY_AFTER_S = 1

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlevel = 3
_short.maxlist = _short.maxtuple = _short.maxdict = 8
_short.maxlong = 40


class APIError(Exception):
    """An HTTP error with the OpenAI / Fireworks envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or type
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"object": "error", "type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(message: str) -> APIError:
    return APIError(500, message, type="internal_error")


def show(value: Any) -> str:
    """A short, bounded rendering of a request value for an error message."""
    try:
        return _short.repr(value)
    except Exception:  # a pathological value must never turn a 400 into a 500
        return "<value>"


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error as one 400, naming the top-level field."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = first["loc"]
    field = str(loc[0]) if loc else None
    if first["type"] == "extra_forbidden":
        where = ".".join(str(p) for p in loc)
        return bad_request(
            f"Extra inputs are not permitted, field: '{where}', value: {show(first['input'])}",
            field,
        )
    # A union reports one error per alternative: merge those of the same field.
    same = [err for err in errors if err["loc"][:1] == loc[:1] and err["type"] != "extra_forbidden"]
    if len(same) > 1:
        alts = [err["msg"].removeprefix("Input should be ") for err in same]
        msg = "Input should be " + " or ".join(dict.fromkeys(alts))
        where = field
    else:
        msg = first["msg"]
        where = ".".join(str(p) for p in loc)
    if first["type"] == "missing":
        return bad_request(f"Field required, field: '{where}'", field)
    return bad_request(f"{msg}, field: '{where}', value: {show(first['input'])}", field)


def refusal(e: Exception, fields: dict[str, str] | None = None) -> APIError | None:
    """An engine's refusal of a request (at submit, or before its first token) as an HTTP
    error; None for anything else (a failure, not the client's fault). `fields` renames the
    engine's field names to the ones the client sent (legacy `logprobs` for top_logprobs)."""
    field = getattr(e, "field", None)
    if field is not None and fields:
        field = fields.get(field, field)
    if isinstance(e, EngineOverloaded):
        return APIError(
            503,
            str(e) or "The server is overloaded; retry later",
            type="service_unavailable",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, ContextLengthExceeded):
        return APIError(400, str(e), param=field, code="context_length_exceeded")
    if isinstance(e, InvalidRequest):
        message = str(e)
        if field != e.field:
            message = message.replace(e.field, field, 1)
        return APIError(400, message, param=field)
    return None
