"""The engine's one admission check: every caller (HTTP or a script calling Engine.generate)
gets the same refusal, naming the field, for a request the engine cannot honour."""

from __future__ import annotations

import dataclasses

import pytest

from engine.admission import Limits, check_request
from engine.requests import (
    ContextLengthExceeded,
    ContextOverflow,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)
from tests import engine_fixtures as F

LIMITS = Limits(vocab_size=100, context_window=50, max_top_logprobs=5, max_logit_bias=2)
OK = GenerationRequest(prompt_ids=(1, 2, 3), max_tokens=10)

# (a change to OK that is just inside a limit, one just past it, the field named)
CASES = [
    (dict(prompt_ids=(99,)), dict(prompt_ids=(100,)), "prompt"),
    (dict(prompt_ids=(0,)), dict(prompt_ids=(-1,)), "prompt"),
    (dict(prompt_ids=(1,)), dict(prompt_ids=()), "prompt"),
    (dict(prompt_ids=(1,)), dict(prompt_ids=(1.5,)), "prompt"),
    (dict(n=128), dict(n=129), "n"),
    (dict(n=1), dict(n=0), "n"),
    (dict(max_tokens=0), dict(max_tokens=-1), "max_tokens"),
    (dict(stop=("a",) * 4), dict(stop=("a",) * 5), "stop"),
    (dict(stop=("a",)), dict(stop=("",)), "stop"),
    (dict(top_logprobs=5), dict(top_logprobs=6), "top_logprobs"),
    (dict(top_logprobs=0), dict(top_logprobs=-1), "top_logprobs"),
    (
        dict(params=SamplingParams(logit_bias={98: 1, 99: 1})),
        dict(params=SamplingParams(logit_bias={98: 1, 99: 1, 97: 1})),
        "logit_bias",
    ),
    (
        dict(params=SamplingParams(logit_bias={99: 1})),
        dict(params=SamplingParams(logit_bias={100: 1})),
        "logit_bias",
    ),
    (dict(prompt_ids=(1,) * 49), dict(prompt_ids=(1,) * 50), "prompt"),
    (
        dict(max_tokens=47, context_overflow=ContextOverflow.ERROR),
        dict(max_tokens=48, context_overflow=ContextOverflow.ERROR),
        "max_tokens",
    ),
]


@pytest.mark.parametrize("ok, bad, field", CASES)
def test_limits(ok, bad, field):
    check_request(dataclasses.replace(OK, **ok), LIMITS)
    with pytest.raises((InvalidRequest, ContextLengthExceeded)) as err:
        check_request(dataclasses.replace(OK, **bad), LIMITS)
    assert err.value.field == field


def test_max_tokens_as_applied():
    assert check_request(OK, LIMITS) == 10
    assert check_request(dataclasses.replace(OK, max_tokens=1000), LIMITS) == 47
    assert check_request(dataclasses.replace(OK, prompt_ids=(1,) * 50, max_tokens=0), LIMITS) == 0


def test_python_api_refuses_what_http_refuses():
    """Engine.generate past max_top_logprobs raises (it used to return fewer alternatives)."""
    pytest.importorskip("torch")
    engine = F.shared_engine()
    for k in (engine.max_top_logprobs + 1, -1):
        with pytest.raises(InvalidRequest) as err:
            engine.generate([5, 6, 7], top_logprobs=k, max_tokens=2)
        assert err.value.field == "top_logprobs"
    [out] = engine.generate([5, 6, 7], top_logprobs=engine.max_top_logprobs, max_tokens=2)
    assert all(len(lp.top) == engine.max_top_logprobs for lp in out.logprobs)


def test_chat_template_errors_name_messages():
    """A conversation the model's template refuses is the request's fault, not a crash."""
    pytest.importorskip("torch")
    engine = F.shared_engine()
    with pytest.raises(InvalidRequest) as err:
        engine.chat([{"role": "user", "content": {"not": "text"}}], max_tokens=1)
    assert err.value.field == "messages"


def test_requests_normalise_lists_and_one_stop_string():
    """A tokenizer's list of ids and a bare stop string mean what they say."""
    r = GenerationRequest(prompt_ids=[1, 2, 3], stop="END")
    assert r.prompt_ids == (1, 2, 3) and r.stop == ("END",)
    assert check_request(r, LIMITS) == 50 - 3  # max_tokens lowered to fit the window
