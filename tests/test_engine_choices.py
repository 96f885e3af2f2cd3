"""n choices beyond the slot count: started from the one kept prefill as slots free."""

from __future__ import annotations

import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from samplers import SamplingParams  # noqa: E402

SAMPLED = SamplingParams(temperature=1.0, top_k=50, seed=99)


def test_more_choices_than_slots():
    engine = F.shared_engine()  # 8 slots
    prompt = F.prompts(1, seed=21, lo=12, hi=12)[0]
    choices = engine.generate(prompt, SAMPLED, n=20, max_tokens=6, ignore_eos=True)
    assert [c.index for c in choices] == list(range(20))
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in choices)
    assert len({c.token_ids for c in choices}) > 15  # independent seed streams
    # Choice i is the same whether it ran in the first wave or a later one.
    first8 = engine.generate(prompt, SAMPLED, n=8, max_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in first8] == [c.token_ids for c in choices[:8]]
    assert F.wait_idle(engine)["active_slots"] == 0


def test_cancelling_a_request_with_pending_choices_frees_everything():
    engine = F.shared_engine()
    prompt = F.prompts(1, seed=22, lo=10, hi=10)[0]
    from engine.requests import GenerationRequest

    handle = engine.submit(GenerationRequest(tuple(prompt), SAMPLED, n=30, max_tokens=40))
    for _ in handle:
        handle.cancel()
        break
    stats = F.wait_idle(engine)
    assert stats["active_slots"] == 0 and stats["queue_length"] == 0
    [after] = engine.generate(prompt, SamplingParams(temperature=0), max_tokens=3)
    assert len(after.token_ids) == 3
