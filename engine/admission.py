"""The one check of a request against an engine's limits, run when it is submitted.

`SamplingParams` has already checked each sampling value's own range when it was built;
what depends on the engine (its vocabulary, context window, logprob and bias tables, how
many choices and stop strings it tracks) is checked here, once, for every caller: the HTTP
server and a research script calling `Engine.generate` get the same answer. A refusal is an
`InvalidRequest` (or `ContextLengthExceeded`) naming the request field at fault.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.requests import (
    ContextLengthExceeded,
    ContextOverflow,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)

MAX_N = 128  # choices per request (Fireworks' and OpenAI's limit)
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token the engine can return at most (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one engine can hold for a request."""

    vocab_size: int
    context_window: int  # prompt + completion tokens
    max_top_logprobs: int  # alternatives per token
    max_logit_bias: int  # logit_bias entries
    max_n: int = MAX_N
    max_stop: int = MAX_STOP


def check_request(r: GenerationRequest, limits: Limits) -> int:
    """Refuse what the engine cannot honour; return max_tokens as it will be applied (lowered
    to fit the context window under ContextOverflow.TRUNCATE)."""
    if not isinstance(r.params, SamplingParams):
        raise InvalidRequest("params", f"params must be a SamplingParams: {type(r.params)}")
    _check_prompt(r.prompt_ids, limits.vocab_size)
    if not 1 <= r.n <= limits.max_n:
        raise InvalidRequest("n", f"n must be between 1 and {limits.max_n}: {r.n}")
    if r.max_tokens < 0:
        raise InvalidRequest("max_tokens", f"max_tokens must be at least 0: {r.max_tokens}")
    _check_stop(r.stop, limits.max_stop)
    top = r.top_logprobs
    if top is not None and not 0 <= top <= limits.max_top_logprobs:
        raise InvalidRequest(
            "top_logprobs",
            f"top_logprobs must be between 0 and {limits.max_top_logprobs}: {top}",
        )
    bias = r.params.logit_bias or {}
    if len(bias) > limits.max_logit_bias:
        raise InvalidRequest(
            "logit_bias",
            f"logit_bias may hold at most {limits.max_logit_bias} entries: {len(bias)}",
        )
    if bias and max(bias) >= limits.vocab_size:
        raise InvalidRequest(
            "logit_bias",
            f"logit_bias token ids must be between 0 and {limits.vocab_size - 1}: {max(bias)}",
        )
    return _fit_context(r, limits.context_window)


def _check_prompt(ids: tuple[int, ...], vocab_size: int) -> None:
    if len(ids) == 0:
        raise InvalidRequest("prompt", "the prompt is empty")
    try:
        array = np.asarray(ids)
    except (OverflowError, TypeError, ValueError):
        raise InvalidRequest("prompt", "prompt token ids must be integers") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise InvalidRequest("prompt", "prompt token ids must be integers")
    if array.min() < 0 or array.max() >= vocab_size:
        raise InvalidRequest("prompt", f"prompt token ids must be between 0 and {vocab_size - 1}")


def _check_stop(stop: tuple[str, ...], most: int) -> None:
    if len(stop) > most:
        raise InvalidRequest("stop", f"stop may hold at most {most} sequences: {len(stop)}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequest("stop", "stop sequences must be non-empty strings")


def _fit_context(r: GenerationRequest, window: int) -> int:
    """A prompt leaves room for at least one generated token (or is scored whole with
    max_tokens = 0); ContextOverflow.ERROR refuses what TRUNCATE would shorten."""
    P = len(r.prompt_ids)
    too_long = P >= window if r.max_tokens > 0 else P > window
    if too_long or (r.context_overflow is ContextOverflow.ERROR and P + r.max_tokens > window):
        raise ContextLengthExceeded(
            "prompt" if too_long else "max_tokens",
            f"The prompt is too long: {P + r.max_tokens} tokens requested ({P} in the "
            f"prompt, {r.max_tokens} for the completion), model maximum context length: "
            f"{window}.",
        )
    return min(r.max_tokens, window - P)
