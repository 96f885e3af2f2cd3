"""Streams at small batch get their tokens one by one (engine.decoding._per_token): a decode
call takes one step while a streamed choice decodes and the live slots fit stream_rows, k
steps otherwise; the tokens and logprobs are the same either way; warm-up compiles the
one-step programs; the server marks its streamed requests."""

from __future__ import annotations

import pytest

from engine.requests import GenerationRequest
from samplers import SamplingParams
from serving.prepare import prepare_completion
from serving.protocol import CompletionRequest
from serving.testing import FakeEngine
from tests import engine_fixtures as F

pytest.importorskip("torch")

K = 4


@pytest.fixture(scope="module")
def engine():
    engine = F.make_engine(decode_steps=K, stream_rows=2, warmup=False)
    yield engine
    engine.close()


def calls_k(engine, monkeypatch) -> list[int]:
    """The k of every decode call the engine dispatches from now on."""
    seen: list[int] = []
    scheduler = engine.scheduler
    real = scheduler._dispatch
    monkeypatch.setattr(scheduler, "_dispatch", lambda k, ahead: seen.append(k) or real(k, ahead))
    return seen


def run(engine, prompts, **request) -> list[dict]:
    handles = [engine.submit(GenerationRequest(p, **request)) for p in prompts]
    return [F.collect(h)[0] for h in handles]


# A multiple of K: a call stops where every live sequence reaches max_tokens
# (tests/test_decode_call_steps.py), so the last one would take fewer steps otherwise.
GREEDY = dict(params=SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True)


def test_a_lone_stream_takes_one_step_a_call_with_hf_greedy_tokens(engine, monkeypatch):
    ks = calls_k(engine, monkeypatch)
    [prompt] = F.prompts(1, seed=40, lo=12, hi=12)
    updates = list(engine.submit(GenerationRequest(prompt, stream=True, **GREEDY)))
    ids = [t for u in updates for t in u.token_ids]
    assert ids == F.hf_greedy(prompt, 12)
    assert ks and set(ks) == {1}
    # each token its own update: none waits for a later step of its call
    assert [len(u.token_ids) for u in updates if u.token_ids] == [1] * 12


def test_without_a_stream_or_beyond_stream_rows_a_call_takes_k_steps(engine, monkeypatch):
    ks = calls_k(engine, monkeypatch)
    prompts = F.prompts(3, seed=41, lo=5, hi=20)
    outs = run(engine, prompts[:1], **GREEDY)  # not streamed
    assert set(ks) == {K}
    ks.clear()
    outs += run(engine, prompts, stream=True, **GREEDY)  # 3 live slots > stream_rows 2
    assert K in ks
    for prompt, out in zip(prompts[:1] + prompts, outs, strict=True):
        assert out["ids"] == F.hf_greedy(prompt, 12)


def test_seeded_tokens_and_logprobs_do_not_depend_on_the_steps_per_call(engine, monkeypatch):
    ks = calls_k(engine, monkeypatch)
    prompts = F.prompts(2, seed=42, lo=6, hi=18)
    sampled = dict(
        params=SamplingParams(temperature=0.9, top_p=0.95, seed=7),
        max_tokens=12,
        ignore_eos=True,
        top_logprobs=2,
    )
    streamed = run(engine, prompts, stream=True, **sampled)
    assert set(ks) == {1}
    ks.clear()
    plain = run(engine, prompts, **sampled)
    assert set(ks) == {K}
    for s, p in zip(streamed, plain, strict=True):
        assert s["ids"] == p["ids"]
        for a, b in zip(s["logprobs"], p["logprobs"], strict=True):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_stream_rows_0_keeps_k_steps(monkeypatch):
    engine = F.make_engine(decode_steps=K, stream_rows=0, warmup=False)
    try:
        ks = calls_k(engine, monkeypatch)
        run(engine, F.prompts(1, seed=43), stream=True, **GREEDY)
        assert set(ks) == {K}
    finally:
        engine.close()


def test_one_step_calls_run_on_the_k_step_programs(monkeypatch):
    """A decode program is told how many of its k steps to run: streaming compiles nothing
    after warm-up, and no program is kept per number of steps (each holds ~30 MB)."""
    engine = F.make_engine(decode_steps=K, stream_rows=2, background_compile=False)
    try:
        p = engine.programs
        assert {key[0] for key in p._decoders} == {K}
        before = set(p._decoders)
        ks = calls_k(engine, monkeypatch)
        outs = run(engine, F.prompts(2, seed=44), stream=True, **GREEDY)
        assert set(ks) == {1} and all(len(o["ids"]) == 12 for o in outs)
        assert set(p._decoders) == before  # nothing compiled on demand
    finally:
        engine.close()


@pytest.mark.parametrize("stream", [True, False])
def test_the_server_marks_streamed_requests(stream):
    fake = FakeEngine(name="m")
    body = {"model": "m", "prompt": "hi", "stream": stream}
    [request] = prepare_completion(CompletionRequest.model_validate(body), fake).requests
    assert request.stream is stream
