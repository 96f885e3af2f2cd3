"""Request schemas and their translation into engine requests (SAMPLING.md sections 1 and 5).

`parse_json` turns raw bytes into a JSON object (bad bytes, bad JSON, NaN, huge or deeply
nested values: 400, never 500). `ChatRequest` / `CompletionRequest` hold every field of
section 1 with strict JSON types; `prepare_chat` / `prepare_completion` check the semantic
rules, merge generation_config defaults into one `SamplingParams` and build one
`GenerationRequest` per prompt. Every failure is an `APIError` the app renders as the
OpenAI / Fireworks error envelope.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from engine.requests import DEFAULT_MAX_TOKENS, ContextOverflow, GenerationRequest
from samplers import SamplingParams, SamplingParamsError

MAX_N = 128
MAX_STOP = 4
# Fields generation_config.json may default (read from the raw file, SAMPLING.md 1.27).
CONFIG_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "typical_p")
TRUNCATION_FIELDS = ("top_k", "top_p", "min_p", "typical_p")  # not defaulted under mirostat
SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "mirostat_target",
    "mirostat_lr",
    "seed",
)

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlevel = 3
_short.maxlist = _short.maxtuple = _short.maxdict = 8
_short.maxlong = 40


class APIError(Exception):
    """An HTTP error with the OpenAI / Fireworks envelope (SAMPLING.md 5.1)."""

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


def show(value: Any) -> str:
    """A short, bounded rendering of a request value for an error message."""
    try:
        return _short.repr(value)
    except Exception:  # a pathological value must never turn a 400 into a 500
        return "<value>"


# ------------------------------------------------------------------------------------ JSON


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


# --------------------------------------------------------------------------------- schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    continuous_usage_stats: bool | None = None


_UNSUPPORTED_PARTS = {
    "image_url": "image inputs",
    "input_image": "image inputs",
    "input_audio": "audio inputs",
    "file": "file inputs",
    "video_url": "video inputs",
}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError(
                "content_type", "content must be a string or an array of content parts"
            )
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise PydanticCustomError(
                    "content_part", "each content part must be an object with a string 'type'"
                )
            kind = part["type"]
            if kind in _UNSUPPORTED_PARTS:
                raise PydanticCustomError(
                    "unsupported_content",
                    f"{_UNSUPPORTED_PARTS[kind]} are not supported by this model "
                    "(text content only)",
                )
            if (
                kind != "text"
                or set(part) - {"type", "text"}
                or not isinstance(part.get("text"), str)
            ):
                raise PydanticCustomError(
                    "content_part",
                    "content parts must be {'type': 'text', 'text': <string>}",
                )
            texts.append(part["text"])
        return "\n".join(texts)

    def template_dict(self) -> dict:
        if self.tool_calls:
            raise bad_request("tool calls are not supported by this server", "messages")
        if self.function_call is not None:
            raise bad_request("function calls are not supported by this server", "messages")
        if self.audio is not None:
            raise bad_request("audio messages are not supported by this server", "messages")
        if self.content is None and self.role != "assistant":
            raise bad_request(f"a {self.role} message must have content", "messages")
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class _CommonRequest(_Strict):
    model: str
    # sampling (SamplingParams checks the ranges)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    mirostat_target: float | None = None
    mirostat_lr: float | None = None
    seed: int | None = None
    # generation
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    context_length_exceeded_behavior: Literal["truncate", "error"] | None = None
    # output
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    echo_last: int | None = None
    raw_output: bool | None = None
    return_token_ids: bool | None = None
    perf_metrics_in_response: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # accepted, no effect on the output
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_isolation_key: str | None = None
    safety_identifier: str | None = None
    prediction: Any = None
    speculation: Any = None
    # accepted only with their neutral value: anything else can't be honoured
    response_format: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    best_of: int | None = None
    reasoning_effort: Any = None
    thinking: Any = None

    def check_unsupported(self) -> None:
        """Fields whose requested behaviour this server cannot honour: 400, never ignored."""
        if self.thinking is not None and self.reasoning_effort is not None:
            raise bad_request(
                "thinking and reasoning_effort cannot be specified together", "thinking"
            )
        for field in ("thinking", "reasoning_effort"):
            if getattr(self, field) is not None:
                raise bad_request(
                    f"{field} is not supported: this model is not a reasoning model", field
                )
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "text" and set(rf) == {"type"}:
                pass
            elif kind == "json_schema" and not (
                rf.get("json_schema") is not None or rf.get("schema") is not None
            ):
                raise bad_request(
                    "response_format json_schema requires a json_schema", "response_format"
                )
            else:
                raise bad_request(
                    f"response_format {show(kind or rf)} is not supported yet "
                    "(only {'type': 'text'}); constrained decoding is not implemented",
                    "response_format",
                )
        if self.tools:
            raise bad_request("tools are not supported by this server yet", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is not supported without tools", "tool_choice")
        if self.functions:
            raise bad_request("functions are not supported by this server", "functions")
        if self.function_call not in (None, "none", "auto"):
            raise bad_request("function_call is not supported by this server", "function_call")
        if self.best_of is not None:
            n = self.n if self.n is not None else 1
            if self.best_of != n:
                raise bad_request(
                    f"best_of must equal n ({n}): ranking candidates by best_of is not "
                    f"supported: {self.best_of}",
                    "best_of",
                )

    def check_generation(self, max_top_logprobs: int) -> None:
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}: {self.n}", "n")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request(
                "max_tokens and max_completion_tokens cannot be specified together", "max_tokens"
            )
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise bad_request(f"{field} must be at least 0: {value}", field)
        if isinstance(self.stop, list):
            if not 1 <= len(self.stop) <= MAX_STOP:
                raise bad_request(
                    f"stop must hold between 1 and {MAX_STOP} sequences: {len(self.stop)}", "stop"
                )
        for s in self.stop_sequences():
            if not s:
                raise bad_request("stop sequences must not be empty", "stop")
        if self.echo_last is not None and self.echo_last < 0:
            raise bad_request(f"echo_last must be at least 0: {self.echo_last}", "echo_last")
        lp = self.logprobs
        if isinstance(lp, int) and not isinstance(lp, bool):
            if not 0 <= lp <= max_top_logprobs:
                raise bad_request(
                    f"logprobs must be between 0 and {max_top_logprobs}: {lp}", "logprobs"
                )
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= max_top_logprobs:
                raise bad_request(
                    f"top_logprobs must be between 0 and {max_top_logprobs}: {self.top_logprobs}",
                    "top_logprobs",
                )
            if self.top_logprobs > 0 and lp in (None, False):
                raise bad_request(
                    "top_logprobs requires logprobs to be set to true", "top_logprobs"
                )

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logprobs_format(self) -> tuple[str | None, int | None]:
        """("new" | "legacy" | None, number of alternatives the engine returns)."""
        lp = self.logprobs
        if lp is None or lp is False:
            return None, None
        if lp is True:
            return "new", self.top_logprobs or 0
        return "legacy", self.top_logprobs if self.top_logprobs is not None else lp


class ChatRequest(_CommonRequest):
    messages: list[ChatMessage]
    prompt_truncate_len: int | None = None
    max_completion_tokens: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    verbosity: str | None = None
    web_search_options: Any = None

    def check_chat(self) -> None:
        if not self.messages:
            raise bad_request("messages must hold at least one message", "messages")
        if self.prompt_truncate_len is not None and self.prompt_truncate_len < 1:
            raise bad_request(
                f"prompt_truncate_len must be at least 1: {self.prompt_truncate_len}",
                "prompt_truncate_len",
            )
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise bad_request("only the text modality is supported", "modalities")
        if self.audio is not None:
            raise bad_request("audio output is not supported", "audio")
        if self.web_search_options is not None:
            raise bad_request("web search is not supported by this server", "web_search_options")


class CompletionRequest(_CommonRequest):
    prompt: Any
    suffix: str | None = None
    prompt_truncate_len: Any = None  # chat only: rejected with a clear message

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        """str | list[str] | list[int] | list[list[int]] → a list of prompts."""
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise PydanticCustomError(
                "prompt_type",
                "prompt must be a string, a non-empty array of strings, an array of token ids "
                "or an array of token-id arrays",
            )
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_int(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return [list(p) for p in value]
        raise PydanticCustomError(
            "prompt_type",
            "prompt arrays must hold only strings, only integer token ids, or only non-empty "
            "arrays of integer token ids",
        )

    def check_completion(self) -> None:
        if self.prompt_truncate_len is not None:
            raise bad_request(
                "prompt_truncate_len is only supported on /v1/chat/completions",
                "prompt_truncate_len",
            )
        if self.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def parse_request(cls: type[_CommonRequest], body: dict) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply") from None


# ------------------------------------------------------------------------- model resolution


def resolve_model(requested: str, served: str) -> bool:
    """A model is named bare or as accounts/<anything>/models/<name>."""
    parts = requested.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == "models":
        requested = parts[3]
    return requested == served or requested == served.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------- engine requests


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    echo_ids: list[int]  # the prompt tokens echoed back (empty without echo / echo_last)
    echo_text: str
    echo_offset: int  # index of echo_ids[0] within ids
    fragments: list[str | int]  # raw_output.prompt_fragments


@dataclasses.dataclass
class Prepared:
    """A validated request, ready for Engine.submit: one GenerationRequest per prompt."""

    kind: Literal["chat", "completion"]
    model: str
    requests: list[GenerationRequest]
    prompts: list[Prompt]
    n: int
    stream: bool
    include_usage: bool
    logprobs_format: str | None
    raw_output: bool
    return_token_ids: bool
    perf_metrics: bool
    options: dict  # fireworks-sampling-options, max_tokens added once the engine applies it


def sampling_params(
    req: _CommonRequest, generation_config: dict | None, vocab_size: int
) -> tuple[SamplingParams, dict]:
    """The request's sampling fields merged with generation_config defaults, and the
    effective options for the fireworks-sampling-options header (binding decision 6)."""
    given = {f: getattr(req, f) for f in SAMPLING_FIELDS if getattr(req, f) is not None}
    config = generation_config or {}
    defaultable = CONFIG_DEFAULTS
    if given.get("mirostat_target") is not None:
        defaultable = tuple(f for f in CONFIG_DEFAULTS if f not in TRUNCATION_FIELDS)
    defaults = {}
    for f in defaultable:
        value = config.get(f)
        if f not in given and value is not None and not isinstance(value, bool):
            defaults[f] = value
    try:
        params = SamplingParams(**defaults, **given)
        params.validate(vocab_size)
    except SamplingParamsError as e:
        raise bad_request(str(e), e.field) from None
    except (TypeError, ValueError) as e:  # e.g. a logit_bias key of 5,000 digits
        raise bad_request(f"invalid sampling parameters: {str(e)[:200]}", "logit_bias") from None
    options: dict[str, Any] = {f: getattr(params, f) for f in CONFIG_DEFAULTS}
    for f in SAMPLING_FIELDS:
        if f in given and f not in options:
            value = getattr(params, f)
            options[f] = {str(k): v for k, v in value.items()} if f == "logit_bias" else value
    if params.mirostat_target is not None:
        options["mirostat_lr"] = params.mirostat_lr
    return params, options


def _common(req: _CommonRequest, engine: Any) -> dict:
    req.check_unsupported()
    req.check_generation(engine.max_top_logprobs)
    params, options = sampling_params(req, engine.generation_config, engine.vocab_size)
    limit = engine.max_logit_bias  # the engine's bias table width
    if params.logit_bias and len(params.logit_bias) > limit:
        raise bad_request(
            f"logit_bias may hold at most {limit} entries: {len(params.logit_bias)}", "logit_bias"
        )
    fmt, k = req.logprobs_format()
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    overflow = ContextOverflow(req.context_length_exceeded_behavior or "truncate")
    return dict(
        params=params,
        options=options,
        fmt=fmt,
        top_logprobs=k,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        overflow=overflow,
    )


def _echo(req: _CommonRequest, ids: list[int], bos: int | None) -> tuple[list[int], int]:
    """The echoed prompt tokens and their offset: echo → the whole prompt (a leading BOS
    excluded), echo_last=N → the last N tokens (clamped to the whole prompt)."""
    start = 1 if ids and bos is not None and ids[0] == bos and len(ids) > 1 else 0
    if req.echo:
        return ids[start:], start
    if req.echo_last:
        offset = max(start, len(ids) - req.echo_last)
        return ids[offset:], offset
    return [], len(ids)


def _prepared(
    kind: Literal["chat", "completion"], req: _CommonRequest, c: dict, prompts: list[Prompt]
) -> Prepared:
    n = req.n or 1
    stop = req.stop_sequences()
    requests = [
        GenerationRequest(
            prompt_ids=tuple(p.ids),
            params=c["params"],
            n=n,
            max_tokens=c["max_tokens"],
            stop=stop,
            ignore_eos=bool(req.ignore_eos),
            top_logprobs=c["top_logprobs"],
            prompt_logprobs=bool(p.echo_ids) and c["fmt"] is not None,
            context_overflow=c["overflow"],
        )
        for p in prompts
    ]
    stream = bool(req.stream)
    return Prepared(
        kind=kind,
        model=req.model,
        requests=requests,
        prompts=prompts,
        n=n,
        stream=stream,
        include_usage=bool(stream and req.stream_options and req.stream_options.include_usage),
        logprobs_format=c["fmt"],
        raw_output=bool(req.raw_output),
        return_token_ids=bool(req.return_token_ids),
        perf_metrics=bool(req.perf_metrics_in_response),
        options=c["options"],
    )


def _truncate_messages(messages: list[dict], limit: int, encode) -> tuple[list[dict], list[int]]:
    """prompt_truncate_len: drop the earliest non-system messages (never the last one) until
    the templated prompt fits `limit` tokens, or nothing more can be dropped."""
    messages = list(messages)
    ids = encode(messages)
    while len(ids) > limit:
        drop = next(
            (i for i, m in enumerate(messages[:-1]) if m["role"] != "system"),
            None,
        )
        if drop is None:
            break
        del messages[drop]
        ids = encode(messages)
    return messages, ids


def prepare_chat(req: ChatRequest, engine: Any) -> Prepared:
    req.check_chat()
    c = _common(req, engine)
    tok = engine.tokenizer
    messages = [m.template_dict() for m in req.messages]

    def encode(msgs: list[dict]) -> list[int]:
        try:
            return list(tok.encode_chat(msgs))
        except Exception as e:  # template errors (role order, missing template) are the
            raise bad_request(f"could not apply the chat template: {e}", "messages") from None

    try:
        rendered = tok.render_chat(messages)
    except Exception as e:
        raise bad_request(f"could not apply the chat template: {e}", "messages") from None
    if req.prompt_truncate_len is not None:
        kept, ids = _truncate_messages(messages, req.prompt_truncate_len, encode)
        echo_source = tok.render_chat(kept) if kept != messages else rendered
    else:
        ids, echo_source = encode(messages), rendered
    echo_ids, offset = _echo(req, ids, None)
    echo_text = ""
    if echo_ids:
        full = len(echo_ids) == len(ids)
        echo_text = echo_source if full else tok.decode(echo_ids, skip_special_tokens=False)
    prompt = Prompt(ids, echo_ids, echo_text, offset, fragments=[rendered])
    return _prepared("chat", req, c, [prompt])


def prepare_completion(req: CompletionRequest, engine: Any) -> Prepared:
    req.check_completion()
    c = _common(req, engine)
    tok = engine.tokenizer
    vocab = engine.vocab_size
    bos = tok.bos_token_id
    prompts = []
    for p in req.prompt:
        if isinstance(p, str):
            ids = list(tok.encode(p, add_special_tokens=True))
            fragments: list[str | int] = [p]
            if ids and bos is not None and ids[0] == bos and len(ids) > 1:
                fragments = [bos, p]
        else:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(
                    f"prompt token ids must be between 0 and {vocab - 1}: {show(bad)}", "prompt"
                )
            ids, fragments = list(p), list(p)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        echo_ids, offset = _echo(req, ids, bos if isinstance(p, str) else None)
        echo_text = ""
        if echo_ids:
            start = 1 if isinstance(p, str) and len(ids) > 1 and ids[0] == bos else 0
            whole = isinstance(p, str) and offset == start  # echo the text exactly as sent
            echo_text = p if whole else tok.decode(echo_ids, skip_special_tokens=False)
        prompts.append(Prompt(ids, echo_ids, echo_text, offset, fragments))
    return _prepared("completion", req, c, prompts)
