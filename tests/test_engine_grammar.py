"""Grammar-constrained decoding in the engine (response_format, tools): the tokens equal HF
transformers' greedy choice among the tokens llguidance allows, free requests of the same
batch are untouched, and mixing them compiles nothing new.

Runs on the shared tiny engine (tests/engine_fixtures.py: 8 slots, k = 8 steps a call).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import llguidance.numpy  # noqa: E402

from engine.requests import GenerationRequest, InvalidRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
COLORS = llguidance.grammar_from("lark", 'start: ("yes" | "no") " " ("red" | "green" | "blue")')
RECORD = llguidance.LLMatcher.grammar_from_json_schema(
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "size": {"enum": ["S", "M", "L"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["ok", "size", "tags"],
        "additionalProperties": False,
    },
    overrides={"whitespace_flexible": False},
)


@pytest.fixture(scope="module")
def engine():
    engine = F.shared_engine()
    yield engine
    # The shared engine serves later tests that count compilations: none may still run.
    engine.scheduler.one_step.wait()


@pytest.fixture(scope="module")
def lltok(engine):
    return llguidance.hf.from_tokenizer(engine.tokenizer.hf, n_vocab=F.VOCAB, eos_token=[F.EOS])


def reference(lltok, grammar: str, prompt: list[int], most: int) -> list[int]:
    """HF's greedy token among those llguidance allows, step by step, until the grammar is
    complete (or `most` tokens): the definition, independent of the engine."""
    import torch

    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    masks = llguidance.numpy.allocate_token_bitmask(1, F.VOCAB)
    ids: list[int] = []
    while len(ids) < most and not matcher.is_stopped():
        with torch.no_grad():
            logits = F.hf_model()(torch.tensor([prompt + ids])).logits[0, -1].numpy()
        llguidance.numpy.fill_next_token_bitmask(matcher, masks, 0)
        allowed = np.unpackbits(masks[0].view(np.uint8), bitorder="little")[: F.VOCAB]
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        assert matcher.consume_token(token)
        ids.append(token)
    return ids


def submit(engine, prompt, params=GREEDY, grammar=None, **kw):
    return engine.submit(
        GenerationRequest(
            tuple(prompt), params, grammar=grammar, grammar_field="response_format", **kw
        )
    )


def accepted(lltok, grammar: str, ids: list[int]) -> bool:
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def test_greedy_constrained_equals_hf_argmax_over_the_allowed_tokens(engine, lltok):
    prompts = F.prompts(6, seed=41, lo=3, hi=24)
    grammars = [COLORS, RECORD, COLORS, RECORD, None, None]
    handles = [
        submit(engine, p, grammar=g, max_tokens=36, ignore_eos=g is None)
        for p, g in zip(prompts, grammars, strict=True)
    ]
    for prompt, g, h in zip(prompts, grammars, handles, strict=True):
        [out] = F.collect(h).values()
        if g is None:  # free requests decoding beside them: HF's greedy tokens
            assert out["ids"] == F.hf_greedy(prompt, 36)
            continue
        assert out["ids"] == reference(lltok, g, prompt, 36)
        assert accepted(lltok, g, out["ids"]), engine.tokenizer.decode(out["ids"])
        assert out["reasons"][-1] == "stop"


def test_json_text_parses(engine):
    import json

    [c] = engine.generate(F.prompts(1, seed=42)[0], GREEDY, max_tokens=40, grammar=RECORD)
    value = json.loads(c.text)
    assert set(value) == {"ok", "size", "tags"} and value["size"] in "SML"
    assert c.finish_reason == "stop"


def _one_step_ready(engine, timeout=120.0) -> None:
    """Wait for the background compile of the one-step decode programs."""
    deadline = time.monotonic() + timeout
    while not engine.scheduler.one_step.split._pairs:
        assert time.monotonic() < deadline, "the one-step decode programs never compiled"
        time.sleep(0.1)


def _compiled(engine) -> set:
    return set(engine.programs._decoders) | set(engine.scheduler.one_step.split._pairs)


def test_free_rows_unchanged_seeds_reproduce_and_nothing_recompiles(engine, lltok):
    # top_k: a draw among the head candidates, which float rounding of the logits (XLA's
    # matmuls differ in the last bit between batch widths) cannot move; a flat top_p's
    # inverse-CDF draw in the tail can, with or without a grammar.
    sampled = [SamplingParams(temperature=1.0, top_k=40, seed=70 + i) for i in range(4)]
    prompts = F.prompts(4, seed=43, lo=4, hi=24)
    free_alone = [
        F.collect(submit(engine, p, sp, max_tokens=12, ignore_eos=True, top_logprobs=2))
        for p, sp in zip(prompts, sampled, strict=True)
    ]
    first = F.collect(submit(engine, prompts[0], sampled[0], grammar=COLORS, max_tokens=20))
    _one_step_ready(engine)
    compiled = _compiled(engine)
    handles = [
        submit(engine, p, sp, max_tokens=12, ignore_eos=True, top_logprobs=2)
        for p, sp in zip(prompts, sampled, strict=True)
    ]
    constrained = [
        submit(engine, p, sp, grammar=g, max_tokens=20)
        for p, sp, g in zip(prompts[:2], sampled[:2], [COLORS, RECORD], strict=True)
    ]
    mixed = [F.collect(h) for h in handles]
    again = [F.collect(h) for h in constrained]
    assert _compiled(engine) == compiled  # nothing compiled for the mix
    for alone, beside in zip(free_alone, mixed, strict=True):
        assert alone[0]["ids"] == beside[0]["ids"]
        for a, b in zip(alone[0]["logprobs"], beside[0]["logprobs"], strict=True):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=1e-5)
            assert a.sampling_logprob == pytest.approx(b.sampling_logprob, abs=1e-5)
    # The seeded constrained request draws the same tokens on the k-step program (sitting
    # out all but the first step) as on the one-step forward and sampling programs.
    assert again[0][0]["ids"] == first[0]["ids"]
    assert accepted(lltok, COLORS, again[0][0]["ids"])
    assert accepted(lltok, RECORD, again[1][0]["ids"])


def test_masks_are_filled_while_the_next_forward_runs(engine, lltok, monkeypatch):
    """With a constrained choice decoding alone, each call's forward is dispatched before the
    host reads the call before it and fills the next mask from its token; the sampling step
    follows: forward, read, mask, sample, call after call. Tokens stay HF's."""
    _one_step_ready(engine)
    sched, events = engine.scheduler, []
    pair, collect, build = sched.one_step.split.pair, sched._collect, sched.masks.build

    class recorded:  # noqa: N801 - stands in for a function or a compiled program
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __call__(self, *args, **kwargs):
            events.append(self.name)
            return self.fn(*args, **kwargs)

        def __getattr__(self, attr):  # a compiled program's input_shardings
            return getattr(self.fn, attr)

    def pair_recorded(*args, **kwargs):
        forward, sample = pair(*args, **kwargs)
        return recorded("forward", forward), recorded("sample", sample)

    def build_recorded(rows, constraints, sharding):
        events.append("mask" if constraints else "free")
        return build(rows, constraints, sharding)

    monkeypatch.setattr(sched.one_step.split, "pair", pair_recorded)
    monkeypatch.setattr(sched, "_collect", recorded("read", collect))
    monkeypatch.setattr(sched.masks, "build", build_recorded)
    prompt = F.prompts(1, seed=47)[0]
    out = F.collect(submit(engine, prompt, GREEDY, grammar=RECORD, max_tokens=30))[0]
    monkeypatch.undo()
    assert out["ids"] == reference(lltok, RECORD, prompt, 30)
    text = " ".join(events)
    overlapped = text.count("forward read mask sample")
    assert overlapped >= len(out["ids"]) - 3, text
    assert "mask forward" not in text  # no forward waited for a mask


def test_n_choices_each_follow_the_grammar(engine, lltok):
    params = SamplingParams(temperature=1.0, seed=5)
    out = F.collect(submit(engine, F.prompts(1, seed=44)[0], params, grammar=RECORD, n=3))
    assert len(out) == 3
    for choice in out.values():
        assert accepted(lltok, RECORD, choice["ids"]) and choice["reasons"][-1] == "stop"


def test_cut_by_max_tokens_is_a_valid_prefix(engine, lltok):
    [c] = engine.generate(F.prompts(1, seed=45)[0], GREEDY, max_tokens=3, grammar=RECORD)
    matcher = llguidance.LLMatcher(lltok, RECORD, log_level=0)
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    assert matcher.consume_tokens(list(c.token_ids)) and not matcher.is_accepting()


@pytest.mark.parametrize(
    "grammar, words",
    [
        (
            llguidance.LLMatcher.grammar_from_json_schema({"type": "array", "uniqueItems": True}),
            "uniqueItems",
        ),
        (llguidance.LLMatcher.grammar_from_json_schema({"$ref": "#/$defs/x"}), "$defs/x"),
        (llguidance.grammar_from("lark", "start: foo"), "foo"),
    ],
)
def test_a_grammar_that_cannot_be_enforced_is_refused_and_serving_goes_on(engine, grammar, words):
    with pytest.raises(InvalidRequest) as e:
        submit(engine, [5, 6, 7], grammar=grammar)
    assert e.value.field == "response_format" and words in str(e.value)
    [c] = engine.generate([5, 6, 7], GREEDY, max_tokens=4, ignore_eos=True)
    assert list(c.token_ids) == F.hf_greedy([5, 6, 7], 4)
