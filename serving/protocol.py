"""Request schemas (docs/sampling.md sections 1 and 5).

`ChatRequest` / `CompletionRequest` hold every field of section 1 with strict JSON types and
the rules that relate HTTP fields to each other (max_tokens and max_completion_tokens
exclusive, top_logprobs needs logprobs, fields that cannot be honoured). Values are checked
against the engine's limits when the engine admits the request (engine.admission), not here;
serving.prepare builds the engine requests. Every failure is an `APIError`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from serving.errors import bad_request, show, validation_error

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
        if self.tool_calls is not None and self.role != "assistant":
            raise bad_request("only assistant messages carry tool_calls", "messages")
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
        if self.tool_calls:
            message["tool_calls"] = [_tool_call(c) for c in self.tool_calls]
        return message


def _tool_call(call: Any) -> dict:
    """An assistant message's tool call, as OpenAI sends it back: {"id", "type": "function",
    "function": {"name", "arguments": a JSON string}}."""
    f = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(f, dict)
        or call.get("type", "function") != "function"
        or not isinstance(call.get("id"), str)
        or not isinstance(f.get("name"), str)
        or not isinstance(f.get("arguments"), str)
    ):
        raise bad_request(
            "each tool call must be {'id': str, 'type': 'function', 'function': "
            "{'name': str, 'arguments': str}}",
            "messages",
        )
    return {"id": call["id"], "type": "function", "function": dict(f)}


class _CommonRequest(_Strict):
    model: str
    # sampling (SamplingParams checks each range, the engine what depends on it)
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
    # informational: shown in the access log (user) or no bearing on a single server's output
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # prefix caching is automatic
    prompt_cache_isolation_key: str | None = None
    safety_identifier: str | None = None
    prediction: Any = None  # a speed hint only; the output is the same
    speculation: Any = None
    # structured output: serving.structured checks it and builds its grammar
    response_format: Any = None
    # function calling (chat): serving.tool_chat checks them
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # accepted only with their neutral value: anything else can't be honoured
    store: bool | None = None
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
        if self.store:
            raise bad_request("store is not supported: this server keeps no completions", "store")
        if self.functions:
            raise bad_request("functions are not supported by this server", "functions")
        if self.function_call not in (None, "none", "auto"):
            raise bad_request("function_call is not supported by this server", "function_call")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request(
                f"best_of must equal n ({self.n or 1}): ranking candidates by best_of is not "
                f"supported: {self.best_of}",
                "best_of",
            )

    def check_fields(self) -> None:
        """The rules between HTTP fields; the values themselves are the engine's to check."""
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request(
                "max_tokens and max_completion_tokens cannot be specified together", "max_tokens"
            )
        if isinstance(self.stop, list) and not self.stop:
            raise bad_request("stop must hold at least one sequence", "stop")
        if self.echo_last is not None and self.echo_last < 0:
            raise bad_request(f"echo_last must be at least 0: {self.echo_last}", "echo_last")
        lp = self.logprobs
        if isinstance(lp, int) and not isinstance(lp, bool) and lp < 0:
            raise bad_request(f"logprobs must be at least 0: {lp}", "logprobs")
        if self.top_logprobs and lp in (None, False):
            raise bad_request("top_logprobs requires logprobs to be set to true", "top_logprobs")
        options = self.stream_options
        if options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
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

    def field_names(self) -> dict[str, str]:
        """The engine's name of a field → the one this request used for it."""
        names = {}
        if self.top_logprobs is None and self.logprobs_format()[0] == "legacy":
            names["top_logprobs"] = "logprobs"
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names


# What apply_chat_template sets itself: a template variable of these names is not the client's.
_TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "tokenize"}


class ChatRequest(_CommonRequest):
    messages: list[ChatMessage]
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (vLLM's field)
    prompt_truncate_len: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    verbosity: str | None = None
    web_search_options: Any = None

    def check_chat(self) -> None:
        if not self.messages:
            raise bad_request("messages must hold at least one message", "messages")
        reserved = _TEMPLATE_RESERVED & set(self.chat_template_kwargs or ())
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set {', '.join(sorted(reserved))}",
                "chat_template_kwargs",
            )
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
        if self.verbosity not in (None, "medium"):
            raise bad_request(
                f"verbosity {show(self.verbosity)} is not supported: this model has no "
                "verbosity control (only 'medium', the default)",
                "verbosity",
            )


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


def parse_request(cls: type[_CommonRequest], body: dict) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply") from None
