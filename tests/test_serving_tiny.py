"""The HTTP server over the real engine on the tiny random Llama (tests/engine_fixtures.py):
field effects end to end in the default suite, sharing the engine tests' compiled engine
(tests/test_serving_engine.py repeats them on the real default model, marked slow); the
counts it reports, and what happens when a device program fails."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import ServingEngine  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.testing import FakeEngine, background_server  # noqa: E402

PROMPT = [101, 2045, 777, 3100, 4242, 999]  # token ids: no BOS, no template


@pytest.fixture(scope="module")
def engine():
    return F.shared_engine()


@pytest.fixture(scope="module")
def http(engine):
    with background_server(create_app(engine)) as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c


def cmpl(http, **fields):
    body = {"model": "tiny-llama", "prompt": PROMPT, "return_token_ids": True, **fields}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ids(body, i=0):
    return body["choices"][i]["token_ids"]


def test_greedy_equivalents(http):
    g = ids(cmpl(http, temperature=0, max_tokens=10, ignore_eos=True))
    assert len(g) == 10
    same = dict(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
    assert ids(cmpl(http, top_k=1, **same)) == g
    assert ids(cmpl(http, min_p=1.0, **same)) == g
    assert ids(cmpl(http, top_p=0, **same)) == g
    assert ids(cmpl(http, top_k=1, mirostat_target=2.0, **same)) == g
    body = cmpl(http, temperature=0, max_tokens=10, ignore_eos=True, n=3)
    assert [ids(body, i) for i in range(3)] == [g, g, g]


def test_seeds(http):
    fields = dict(temperature=1.0, top_p=1.0, max_tokens=24, ignore_eos=True)
    a = ids(cmpl(http, seed=42, **fields))
    assert ids(cmpl(http, seed=42, **fields)) == a
    assert ids(cmpl(http, seed=43, **fields)) != a


def test_logit_bias_forces_and_ignore_eos_counts(http):
    body = cmpl(http, temperature=0, max_tokens=8, logit_bias={"5000": 100})
    assert ids(body) == [5000] * 8 and body["choices"][0]["finish_reason"] == "length"
    body = cmpl(http, max_tokens=50, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 50
    assert body["choices"][0]["finish_reason"] == "length"


def test_context_window_truncates(http, engine):
    body = cmpl(http, max_tokens=1000, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == engine.max_context - len(PROMPT)
    r = http.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": PROMPT,
            "max_tokens": 1000,
            "context_length_exceeded_behavior": "error",
        },
    )
    assert r.status_code == 400 and "maximum context length" in r.text


def test_echo_prompt_logprobs(http):
    body = cmpl(http, echo=True, max_tokens=0, logprobs=2)
    lp = body["choices"][0]["logprobs"]
    assert lp["token_ids"] == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    last = cmpl(http, echo_last=2, max_tokens=0, logprobs=2)["choices"][0]["logprobs"]
    assert last["token_logprobs"] == lp["token_logprobs"][-2:]
    assert body["usage"]["completion_tokens"] == 0


def test_greedy_logprobs(http):
    body = cmpl(http, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token_id"] for e in content] == ids(body)
    for e in content:
        assert abs(e["logprob"] - max(t["logprob"] for t in e["top_logprobs"])) < 1e-4
        assert e["sampling_logprob"] == 0.0


def test_stream_equals_non_stream_and_raw_output(http):
    fields = dict(temperature=0.9, seed=11, max_tokens=20, ignore_eos=True)
    full = cmpl(http, raw_output=True, **fields)
    raw = full["choices"][0]["raw_output"]
    assert raw["prompt_token_ids"] == PROMPT
    assert raw["completion_token_ids"] == ids(full)
    body = {"model": "tiny-llama", "prompt": PROMPT, "stream": True, **fields}
    with http.stream("POST", "/v1/completions", json=body) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_chat_through_the_template(http, engine):
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": "accounts/fireworks/models/tiny-llama",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "ignore_eos": True,
            "raw_output": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    raw = body["choices"][0]["raw_output"]
    assert raw["prompt_token_ids"] == engine.tokenizer.encode_chat(
        [{"role": "user", "content": "Hi"}]
    )
    assert body["usage"]["completion_tokens"] == 5
    options = json.loads(r.headers["fireworks-sampling-options"])
    assert options["temperature"] == 1.0  # the tiny model's generation_config sets none


# ---------------------------------------------------- reported counts and failures

MARKER = 4321  # a prompt holding this token id makes the injected prefill fail


def cmpl_ids(http, prompt, **fields) -> httpx.Response:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, **fields}
    return http.post("/v1/completions", json=body)


def test_both_engines_satisfy_the_serving_interface(engine):
    assert isinstance(engine, ServingEngine)
    assert isinstance(FakeEngine(), ServingEngine)


def test_cached_tokens_header_equals_usage(engine, http):
    first, other = F.prompts(2, seed=11, lo=40, hi=40)
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    assert cmpl_ids(http, first, temperature=0).status_code == 200
    F.wait_idle(engine)
    r = cmpl_ids(http, first[:32] + other[:8], temperature=0)
    assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 32
    assert r.headers["fireworks-cached-prompt-tokens"] == "32"
    streamed = cmpl_ids(http, first[:32] + other[8:16], temperature=0, stream=True)
    assert streamed.headers["fireworks-cached-prompt-tokens"] == "32"


def test_a_failed_device_program_is_logged_once_and_others_carry_on(
    engine, http, monkeypatch, caplog
):
    programs = engine.scheduler.p
    prefill, extender = programs.prefill, programs.extender

    def failing(program):
        """The program, failing on the marked prompt's tokens (a prefill's second argument,
        an extension's third)."""

        def run(*args):
            if MARKER in np.asarray(args[2 if len(args) > 3 else 1]):
                raise RuntimeError("injected device fault")
            return program(*args)

        return run

    # A prompt all new: the prefill program on XLA's ops, an extension on the CPU kernels.
    monkeypatch.setattr(programs, "prefill", failing(prefill))
    monkeypatch.setattr(programs, "extender", lambda *a: failing(extender(*a)))
    engine.scheduler.forget_cached()  # every prompt is prefilled (none reuses a slot)
    caplog.set_level(logging.INFO)
    # A long stream runs beside the failing request, and one more request comes after.
    long = {}

    def stream() -> None:
        long["r"] = cmpl_ids(
            http, F.prompts(1, seed=5)[0], max_tokens=40, ignore_eos=True, stream=True
        )

    t = threading.Thread(target=stream)
    t.start()
    bad = cmpl_ids(http, [101, 102, MARKER, 103])
    t.join()
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["type"] == "internal_error" and "injected device fault" in error["message"]
    assert long["r"].status_code == 200
    assert long["r"].text.rstrip().endswith("data: [DONE]") and '"error"' not in long["r"].text
    assert cmpl_ids(http, [101, 102, 103]).status_code == 200

    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("jaxfire")]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "injected device fault" in str(tracebacks[0].exc_info[1])
    assert tracebacks[0].name == "jaxfire.engine"
    access = [r.getMessage() for r in caplog.records if r.name == "jaxfire.access"]
    assert any(" 500 " in line for line in access), access
    assert sum(" 200 " in line for line in access) >= 2, access
    assert F.wait_idle(engine)["active_slots"] == 0
