"""A validated HTTP request → the engine requests it asks for (one per prompt).

The request's sampling fields merge with the model's generation_config defaults into one
`SamplingParams`; the effective values go back in the fireworks-sampling-options header. Chat
messages go through the model's template (prompt_truncate_len drops the earliest turns);
echo / echo_last pick the prompt tokens sent back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from engine.requests import (
    DEFAULT_MAX_TOKENS,
    ChatTokenizer,
    ContextOverflow,
    GenerationRequest,
    SamplingParams,
    SamplingParamsError,
    ServingEngine,
)
from serving.errors import bad_request
from serving.protocol import ChatRequest, CompletionRequest, _CommonRequest
from serving.structured import response_format_grammar
from serving.tool_chat import ToolSetup, native_tools, prepare_tools, template_messages

# Fields generation_config.json may default (read from the raw file, docs/sampling.md 1.27).
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


def resolve_model(requested: str, served: str) -> bool:
    """A model is named bare or as accounts/<anything>/models/<name>."""
    parts = requested.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == "models":
        requested = parts[3]
    return requested == served or requested == served.rsplit("/", 1)[-1]


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    echo_ids: list[int]  # the prompt tokens echoed back (empty without echo / echo_last)
    echo_text: str | None  # their text; None: decoded once the engine has accepted the ids
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
    include_usage: bool  # a usage chunk before [DONE]
    continuous_usage: bool  # usage on every chunk (vLLM's continuous_usage_stats)
    obfuscation: bool  # an "obfuscation" padding field on streamed deltas
    logprobs_format: str | None
    raw_output: bool
    return_token_ids: bool
    perf_metrics: bool
    options: dict  # fireworks-sampling-options, max_tokens added once the engine applies it
    field_names: dict[str, str]  # the engine's field name → the one the client sent
    user: str | None
    tools: ToolSetup | None = None  # the reply is parsed for tool calls


@dataclasses.dataclass(frozen=True)
class _Generation:
    """What every prompt of one request shares."""

    params: SamplingParams
    options: dict
    logprobs_format: str | None
    top_logprobs: int | None
    max_tokens: int
    overflow: ContextOverflow
    grammar: str | None  # llguidance grammar every reply must follow
    grammar_field: str  # the request field it comes from


def sampling_params(
    req: _CommonRequest, generation_config: dict | None
) -> tuple[SamplingParams, dict]:
    """The request's sampling fields merged with generation_config defaults, and the
    effective options for the fireworks-sampling-options header (docs/sampling.md 1.27)."""
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
    except SamplingParamsError as e:
        raise bad_request(str(e), e.field) from None
    options: dict[str, Any] = {f: getattr(params, f) for f in CONFIG_DEFAULTS}
    for f in SAMPLING_FIELDS:
        if f in given and f not in options:
            value = getattr(params, f)
            options[f] = {str(k): v for k, v in value.items()} if f == "logit_bias" else value
    if params.mirostat_target is not None:
        options["mirostat_lr"] = params.mirostat_lr
    return params, options


def _generation(req: _CommonRequest, engine: ServingEngine) -> _Generation:
    req.check_unsupported()
    req.check_fields()
    params, options = sampling_params(req, engine.generation_config)
    fmt, k = req.logprobs_format()
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    return _Generation(
        params=params,
        options=options,
        logprobs_format=fmt,
        top_logprobs=k,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        overflow=ContextOverflow(req.context_length_exceeded_behavior or "truncate"),
        grammar=response_format_grammar(req.response_format),
        grammar_field="response_format",
    )


def _leading_bos(ids: list[int], bos: int | None) -> bool:
    """The prompt starts with a BOS the tokenizer added (not the whole prompt)."""
    return bos is not None and len(ids) > 1 and ids[0] == bos


def _echo(req: _CommonRequest, ids: list[int], bos: int | None) -> tuple[list[int], int]:
    """The echoed prompt tokens and their offset: echo → the whole prompt (a leading BOS
    excluded), echo_last=N → the last N tokens (clamped to the whole prompt)."""
    start = 1 if _leading_bos(ids, bos) else 0
    if req.echo:
        return ids[start:], start
    if req.echo_last:
        offset = max(start, len(ids) - req.echo_last)
        return ids[offset:], offset
    return [], len(ids)


def _prepared(
    kind: Literal["chat", "completion"],
    req: _CommonRequest,
    g: _Generation,
    prompts: list[Prompt],
    tools: ToolSetup | None = None,
) -> Prepared:
    n = req.n if req.n is not None else 1
    requests = [
        GenerationRequest(
            prompt_ids=tuple(p.ids),
            params=g.params,
            n=n,
            max_tokens=g.max_tokens,
            stop=req.stop_sequences(),
            ignore_eos=bool(req.ignore_eos),
            top_logprobs=g.top_logprobs,
            prompt_logprobs=bool(p.echo_ids) and g.logprobs_format is not None,
            context_overflow=g.overflow,
            grammar=g.grammar,
            grammar_field=g.grammar_field,
            stream=bool(req.stream),
        )
        for p in prompts
    ]
    stream = bool(req.stream)
    options = req.stream_options
    return Prepared(
        kind=kind,
        model=req.model,
        requests=requests,
        prompts=prompts,
        n=n,
        stream=stream,
        include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.continuous_usage_stats),
        obfuscation=bool(options and options.include_obfuscation),
        logprobs_format=g.logprobs_format,
        raw_output=bool(req.raw_output),
        return_token_ids=bool(req.return_token_ids),
        perf_metrics=bool(req.perf_metrics_in_response),
        options=g.options,
        field_names=req.field_names(),
        user=req.user,
        tools=tools,
    )


def _truncate_messages(
    messages: list[dict], limit: int, encode: Callable[[list[dict]], list[int]]
) -> tuple[list[dict], list[int]]:
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


def _template(
    tok: ChatTokenizer,
    messages: list[dict],
    render: bool,
    tools: list[dict] | None = None,
    options: dict | None = None,
) -> Any:
    """The chat template applied (text, or token ids); its errors (role order, a model
    without a template, an option it rejects) are the request's fault."""
    try:
        if render:
            return tok.render_chat(messages, tools=tools, options=options)
        return list(tok.encode_chat(messages, tools=tools, options=options))
    except Exception as e:  # noqa: BLE001 - jinja raises anything a template throws
        raise bad_request(f"could not apply the chat template: {e}", "messages") from None


def prepare_chat(req: ChatRequest, engine: ServingEngine) -> Prepared:
    req.check_chat()
    g = _generation(req, engine)
    tok = engine.tokenizer
    native = native_tools(tok.chat_template)
    tools, setup, forced = prepare_tools(
        req.tools, req.tool_choice, req.parallel_tool_calls, tok.chat_template
    )
    if forced is not None:
        if g.grammar is not None:
            raise bad_request(
                "tool_choice forcing a call cannot be combined with response_format",
                "tool_choice",
            )
        g = dataclasses.replace(g, grammar=forced, grammar_field="tool_choice")
    messages = template_messages([m.template_dict() for m in req.messages], tools, native)
    shown = tools if native else None  # else they are in the system prompt
    options = req.chat_template_kwargs
    rendered = _template(tok, messages, True, shown, options)
    if req.prompt_truncate_len is not None:
        encode = lambda msgs: _template(tok, msgs, False, shown, options)  # noqa: E731
        kept, ids = _truncate_messages(messages, req.prompt_truncate_len, encode)
        echo_source = _template(tok, kept, True, shown, options) if kept != messages else rendered
    else:
        ids, echo_source = _template(tok, messages, False, shown, options), rendered
    echo_ids, offset = _echo(req, ids, None)
    echo_text = ""
    if echo_ids:
        full = len(echo_ids) == len(ids)
        echo_text = echo_source if full else tok.decode(echo_ids, skip_special_tokens=False)
    prompt = Prompt(ids, echo_ids, echo_text, offset, fragments=[rendered])
    return _prepared("chat", req, g, [prompt], setup)


def prepare_completion(req: CompletionRequest, engine: ServingEngine) -> Prepared:
    req.check_completion()
    for field in ("tools", "tool_choice", "parallel_tool_calls"):
        if getattr(req, field) not in (None, "none"):
            raise bad_request(f"{field} is only supported on /v1/chat/completions", field)
    g = _generation(req, engine)
    tok = engine.tokenizer
    bos = tok.bos_token_id
    prompts = []
    for p in req.prompt:
        if isinstance(p, str):
            ids = list(tok.encode(p, add_special_tokens=True))
            fragments: list[str | int] = [bos, p] if _leading_bos(ids, bos) else [p]
            text_bos = bos
        else:  # token ids: the engine checks them against its vocabulary
            ids, fragments, text_bos = list(p), list(p), None
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        echo_ids, offset = _echo(req, ids, text_bos)
        whole = isinstance(p, str) and offset == int(_leading_bos(ids, bos))
        echo_text = p if whole else None  # a string prompt is echoed exactly as sent
        prompts.append(Prompt(ids, echo_ids, echo_text, offset, fragments))
    return _prepared("completion", req, g, prompts)
