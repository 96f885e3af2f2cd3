"""What goes into the engine and what comes out: the contract between engine and callers.

A caller (serving/, a research script) builds a `GenerationRequest` from token ids and a
`SamplingParams`, submits it, and reads `ChoiceUpdate`s until every choice has a
finish_reason. `ServingEngine` is all a server needs of an engine; the real `Engine` and the
test fake both satisfy it. Everything here is plain data; no device arrays cross this line.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

# Re-exported: a caller builds requests from these without reaching into samplers.
from samplers import SamplingParams as SamplingParams
from samplers import SamplingParamsError as SamplingParamsError

DEFAULT_MAX_TOKENS = 2048


class EngineError(Exception):
    """Base of the engine's typed errors; `field` names the request field at fault, if any."""

    field: str | None = None


class EngineOverloaded(EngineError):
    """The admission queue is full; retry later (the server answers 503 + Retry-After)."""


class ContextLengthExceeded(EngineError):
    """The prompt (or prompt + max_tokens under "error") does not fit the context window;
    `field` is "prompt" or "max_tokens", whichever is at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class InvalidRequest(EngineError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ContextOverflow(enum.Enum):
    TRUNCATE = "truncate"  # lower max_tokens to fit (Fireworks' default)
    ERROR = "error"  # refuse a request whose prompt + max_tokens exceeds the window


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int | None = None  # None: no logprobs; k: raw logprob + k alternatives
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (echo with logprobs)
    context_overflow: ContextOverflow = ContextOverflow.TRUNCATE
    # llguidance grammar text every token must follow (engine.grammar), and the request
    # field it came from, named by the error when it cannot be enforced.
    grammar: str | None = None
    grammar_field: str = "grammar"
    # The caller reads tokens as they come (an HTTP stream, Engine.stream): at small batch
    # its decode calls take one step each, so no token waits for the call's later ones.
    stream: bool = False

    def __post_init__(self) -> None:
        # A list (what a tokenizer returns) or one stop string is what a caller means: store
        # them as the tuples the engine works with.
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # raw model log-probability; None for the first prompt token
    sampling_logprob: float | None  # under the distribution drawn from; None for prompt
    top: tuple[tuple[int, float], ...] = ()  # (token id, raw logprob), best first


@dataclasses.dataclass(frozen=True)
class ChoiceUpdate:
    """New output of one choice. `text` never contains any part of a stop string; on the
    last update of a choice `finish_reason` is "stop" or "length"."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Timing:
    queue_s: float  # submit → prefill start
    time_to_first_token_s: float  # submit → first token
    decode_s: float  # first token → last token


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished choice, as `Engine.generate` returns it."""

    index: int
    text: str  # stop string excluded, special tokens skipped
    token_ids: tuple[int, ...]  # every generated token (the stop-string tokens included)
    raw_text: str  # the generated text with special tokens, before stop truncation
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None
    prompt_tokens: int
    timing: Timing | None = None


class RequestHandle(Protocol):
    """One submitted request: `async for` yields its ChoiceUpdates; the counts are set at
    submit (prompt_tokens, max_tokens as applied) and admission (cached_tokens)."""

    request: GenerationRequest
    prompt_tokens: int
    max_tokens: int
    cached_tokens: int
    prompt_logprobs: tuple[TokenLogprob, ...] | None
    timing: Timing | None

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[ChoiceUpdate]: ...


class ChatTokenizer(Protocol):
    """The tokenizer calls a server makes."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        options: dict | None = None,
    ) -> str: ...

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, options: dict | None = None
    ) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


@runtime_checkable
class ServingEngine(Protocol):
    """What serving/ needs of an engine. `submit` raises only EngineError subclasses for a
    request it refuses (engine.admission says which)."""

    name: str
    tokenizer: ChatTokenizer
    generation_config: dict | None
    max_context: int

    def submit(self, request: GenerationRequest) -> RequestHandle: ...

    def stats(self) -> dict[str, Any]: ...
