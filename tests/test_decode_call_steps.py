"""How many steps a decode call runs (engine.decoding._call_steps): decode_steps, fewer when
every live sequence reaches max_tokens sooner, at most STREAMED_STEPS while one streams on
a batch too wide for one token a call; the tokens are those of any other step count."""

from __future__ import annotations

import tests.engine_fixtures as F
from engine.decoding import STREAMED_STEPS
from engine.requests import GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def dispatched_steps(monkeypatch, engine) -> list[int]:
    """The step count of every decode call the engine's scheduler dispatches from now on."""
    steps: list[int] = []
    dispatch = engine.scheduler._dispatch

    def recording(k: int, ahead: int):
        steps.append(k)
        return dispatch(k, ahead)

    monkeypatch.setattr(engine.scheduler, "_dispatch", recording)
    return steps


def test_calls_stop_where_every_sequence_reaches_max_tokens(monkeypatch):
    engine = F.shared_engine()  # decode_steps = 8
    prompt = F.prompts(1, seed=31, lo=9, hi=9)[0]
    steps = dispatched_steps(monkeypatch, engine)
    [c] = engine.generate(prompt, GREEDY, max_tokens=11, ignore_eos=True)
    assert len(c.token_ids) == 11
    # 11 tokens take a call of 8 and one of the 3 left, not a second call of 8 whose last 5
    # steps nobody reads.
    assert steps == [F.K, 11 - F.K]
    monkeypatch.undo()
    [again] = engine.generate(prompt, GREEDY, max_tokens=11, ignore_eos=True)
    assert again.token_ids == c.token_ids


def test_a_stream_on_a_wide_batch_gets_shorter_calls_and_the_same_tokens(monkeypatch):
    wide = F.make_engine(decode_steps=8, stream_rows=0, warmup=False)  # never one a call
    try:
        prompt = F.prompts(1, seed=32, lo=9, hi=9)[0]
        seeded = SamplingParams(temperature=1.0, seed=5)
        [plain] = wide.generate(prompt, seeded, max_tokens=20, ignore_eos=True)
        steps = dispatched_steps(monkeypatch, wide)
        handle = wide.submit(
            GenerationRequest(tuple(prompt), seeded, max_tokens=20, ignore_eos=True, stream=True)
        )
        streamed = [t for update in handle for t in update.token_ids]
        assert STREAMED_STEPS < 8 and steps and max(steps) == STREAMED_STEPS
        assert streamed == list(plain.token_ids)
    finally:
        wide.close()
