"""Engine generation against HF transformers, seeds, stop strings, limits, n and logprobs.

Everything runs on a tiny random Llama with SmolLM2's tokenizer (tests/engine_fixtures.py),
through one shared engine (8 slots, context 64, k = 8 decode steps per sync).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import (  # noqa: E402
    ContextLengthExceeded,
    ContextOverflow,
    GenerationRequest,
)
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=50, seed=1234)


@pytest.fixture(scope="module")
def engine():
    return F.shared_engine()


def submit(engine, prompt, params=GREEDY, **kw):
    return engine.submit(GenerationRequest(tuple(prompt), params, **kw))


def test_greedy_matches_hf_under_continuous_batching(engine):
    prompts = F.prompts(7, seed=1, lo=2, hi=45)
    new = [14, 9, 18, 6, 12, 16, 10]
    # A long request first; the rest join while it decodes, and short ones finish and
    # free their slots while the others run: no token may change.
    first = submit(engine, prompts[0], max_tokens=new[0], ignore_eos=True)
    head = next(iter(first))  # it is decoding now
    rest = [
        submit(engine, p, max_tokens=m, ignore_eos=True)
        for p, m in zip(prompts[1:], new[1:], strict=True)
    ]
    got = [F.collect(first)] + [F.collect(h) for h in rest]
    got[0][0]["ids"][:0] = head.token_ids
    for prompt, m, out in zip(prompts, new, got, strict=True):
        assert out[0]["ids"] == F.hf_greedy(prompt, m), f"prompt of {len(prompt)} tokens"
        assert out[0]["reasons"][-1] == "length"


def test_generate_returns_completions(engine):
    prompt = F.prompts(1, seed=2, lo=12, hi=12)[0]
    [c] = engine.generate(prompt, GREEDY, max_tokens=8, ignore_eos=True)
    assert list(c.token_ids) == F.hf_greedy(prompt, 8)
    assert c.text == engine.tokenizer.decode(c.token_ids)
    assert c.finish_reason == "length" and c.prompt_tokens == 12 and c.logprobs is None
    assert c.timing is not None and c.timing.time_to_first_token_s >= c.timing.queue_s >= 0


def _sampled_ids(engine, prompt, n_tokens=16):
    [c] = engine.generate(prompt, SAMPLED, max_tokens=n_tokens, ignore_eos=True)
    return list(c.token_ids)


def test_seeded_request_reproduces_under_load_and_across_k(engine):
    prompt = F.prompts(1, seed=3, lo=20, hi=20)[0]
    alone = _sampled_ids(engine, prompt)
    assert alone != F.hf_greedy(prompt, 16)  # it really samples

    # 16 other requests in flight (8 before it: it waits in the queue for a freed slot).
    others = [
        SamplingParams(temperature=0.9, top_k=40, seed=i) if i % 2 else GREEDY for i in range(16)
    ]
    other_prompts = F.prompts(16, seed=4, lo=3, hi=40)
    before = [
        submit(engine, p, sp, max_tokens=10 + 3 * i)
        for i, (p, sp) in enumerate(zip(other_prompts[:8], others[:8], strict=True))
    ]
    target = submit(engine, prompt, SAMPLED, max_tokens=16, ignore_eos=True)
    after = [
        submit(engine, p, sp, max_tokens=5 + 2 * i)
        for i, (p, sp) in enumerate(zip(other_prompts[8:], others[8:], strict=True))
    ]
    assert F.collect(target)[0]["ids"] == alone
    for h in before + after:
        F.collect(h)
    # After all of them finished and freed their slots.
    assert _sampled_ids(engine, prompt) == alone

    # k = 1 (one token per host sync) draws the same tokens as k = 8.
    one_step = F.make_engine(
        max_slots=F.SLOTS, max_len=F.MAX_LEN, decode_steps=1, max_queue=4, warmup=False
    )
    try:
        assert _sampled_ids(one_step, prompt) == alone
        [c] = one_step.generate(prompt, GREEDY, max_tokens=10, ignore_eos=True)
        assert list(c.token_ids) == F.hf_greedy(prompt, 10)
    finally:
        one_step.close()


def _stop_case(engine, prompt, n_tokens=24):
    """A stop string that spans a token boundary of the greedy text, first seen there."""
    [full] = engine.generate(prompt, GREEDY, max_tokens=n_tokens, ignore_eos=True)
    tok, ids, text = engine.tokenizer, list(full.token_ids), full.text
    for j in range(2, len(ids) - 2):
        end = len(tok.decode(ids[: j + 1]))
        nxt = len(tok.decode(ids[: j + 2]))
        if text[:end] != tok.decode(ids[: j + 1]) or end < 2 or nxt - end < 2:
            continue
        stop = text[end - 2 : end + 2]
        if stop.strip() == stop and text.find(stop) == end - 2:
            return full, stop, j, end - 2
    pytest.skip("no token boundary suitable for a stop string")


def test_stop_string_across_tokens_is_never_emitted(engine):
    prompt = F.prompts(1, seed=5, lo=9, hi=9)[0]
    full, stop, j, cut = _stop_case(engine, prompt)
    h = submit(engine, prompt, max_tokens=24, ignore_eos=True, stop=("never-there", stop))
    out = F.collect(h)[0]
    emitted = "".join(out["deltas"])
    assert emitted == full.text[:cut]
    assert out["reasons"][-1] == "stop" and out["reasons"][:-1] == [None] * (
        len(out["reasons"]) - 1
    )
    assert out["ids"] == list(full.token_ids[: j + 2])  # up to the token completing it
    for piece in {stop[a:b] for a in range(len(stop)) for b in range(a + 1, len(stop) + 1)}:
        assert not emitted.endswith(piece)
    # Ending one token early (the stop string only half generated): the held-back text is
    # released when the sequence ends.
    [c] = engine.generate(prompt, GREEDY, max_tokens=j + 1, ignore_eos=True, stop=(stop,))
    assert c.text == full.text[: len(engine.tokenizer.decode(full.token_ids[: j + 1]))]
    assert c.finish_reason == "length"


def test_eos_stops_and_ignore_eos_runs_to_max_tokens(engine):
    prompt = F.prompts(1, seed=6, lo=7, hi=7)[0]
    eos_first = SamplingParams(temperature=0.0, logit_bias={F.EOS: 100.0})
    [c] = engine.generate(prompt, eos_first, max_tokens=20)
    assert c.token_ids == (F.EOS,) and c.text == "" and c.finish_reason == "stop"
    assert c.raw_text == engine.tokenizer.decode([F.EOS], skip_special_tokens=False)

    [c] = engine.generate(prompt, eos_first, max_tokens=11, ignore_eos=True)
    assert c.token_ids == (F.EOS,) * 11 and c.finish_reason == "length"

    plain = SamplingParams(temperature=1.0, seed=3)
    for m in (1, 8, 13):  # below, at and past one k = 8 sync
        [c] = engine.generate(prompt, plain, max_tokens=m, ignore_eos=True)
        assert len(c.token_ids) == m and c.finish_reason == "length"


def test_context_limit_truncates_or_errors(engine):
    C = F.MAX_LEN
    prompt = F.prompts(1, seed=7, lo=C - 10, hi=C - 10)[0]
    [c] = engine.generate(prompt, GREEDY, max_tokens=100, ignore_eos=True)
    assert list(c.token_ids) == F.hf_greedy(prompt, 10)  # up to the last cache position
    assert c.finish_reason == "length"

    with pytest.raises(ContextLengthExceeded):
        engine.generate(prompt, GREEDY, max_tokens=11, context_overflow=ContextOverflow.ERROR)
    [c] = engine.generate(
        prompt, GREEDY, max_tokens=10, ignore_eos=True, context_overflow=ContextOverflow.ERROR
    )
    assert len(c.token_ids) == 10

    [c] = engine.generate(prompt + prompt[:9], GREEDY, max_tokens=5, ignore_eos=True)  # P = C-1
    assert len(c.token_ids) == 1 and c.finish_reason == "length"
    for P in (C, C + 5):
        with pytest.raises(ContextLengthExceeded):
            engine.generate((prompt * 2)[:P], GREEDY, max_tokens=1)


def test_n_choices_have_independent_seeds(engine):
    prompt = F.prompts(1, seed=8, lo=15, hi=15)[0]
    choices = engine.generate(prompt, SAMPLED, n=4, max_tokens=12, ignore_eos=True)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    ids = [c.token_ids for c in choices]
    assert len(set(ids)) == 4, ids
    # Choice i draws from fold_in(request key, i): choice 0 is the n = 1 request.
    assert list(ids[0]) == _sampled_ids(engine, prompt, 12)
    again = engine.generate(prompt, SAMPLED, n=4, max_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in again] == ids

    greedy = engine.generate(prompt, GREEDY, n=4, max_tokens=12, ignore_eos=True)
    assert {c.token_ids for c in greedy} == {tuple(F.hf_greedy(prompt, 12))}


def test_prompt_and_token_logprobs_match_hf(engine):
    prompt = F.prompts(1, seed=9, lo=30, hi=30)[0]
    h = submit(engine, prompt, max_tokens=5, ignore_eos=True, prompt_logprobs=True, top_logprobs=3)
    out = F.collect(h)[0]
    ref = F.hf_logprobs(prompt + out["ids"])
    entries = h.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0].logprob is None and entries[0].top == ()
    for i in range(1, len(prompt)):
        e = entries[i]
        assert e.token_id == prompt[i]
        np.testing.assert_allclose(e.logprob, ref[i - 1, prompt[i]], atol=2e-4)
        assert [t for t, _ in e.top] == np.argsort(-ref[i - 1], kind="stable")[:3].tolist()
        np.testing.assert_allclose(
            [lp for _, lp in e.top], np.sort(ref[i - 1])[::-1][:3], atol=2e-4
        )
    for j, e in enumerate(out["logprobs"]):  # generated tokens: raw logprobs, greedy argmax
        row = ref[len(prompt) - 1 + j]
        assert e.token_id == out["ids"][j] == int(np.argmax(row))
        np.testing.assert_allclose(e.logprob, row[e.token_id], atol=2e-4)
        assert e.sampling_logprob == 0.0 and e.top[0][0] == e.token_id


def test_max_tokens_zero_scores_the_prompt(engine):
    C = F.MAX_LEN
    prompt = F.prompts(1, seed=10, lo=C, hi=C)[0]  # P = C is allowed with max_tokens = 0
    h = submit(engine, prompt, max_tokens=0, n=2, prompt_logprobs=True, top_logprobs=0)
    out = F.collect(h)
    assert sorted(out) == [0, 1]
    for c in out.values():
        assert c["ids"] == [] and "".join(c["deltas"]) == "" and c["reasons"] == ["length"]
    ref = F.hf_logprobs(prompt)
    got = [e.logprob for e in h.prompt_logprobs[1:]]
    np.testing.assert_allclose(got, ref[np.arange(C - 1), prompt[1:]], atol=2e-4)
    [c] = engine.generate(prompt[:5], GREEDY, max_tokens=0)
    assert c.token_ids == () and c.text == "" and c.finish_reason == "length"
