"""A prompt that starts with full KV pages the prefix cache holds (a shared system prompt,
an earlier turn of the conversation) maps them and is prefilled only from the first page that
differs. Pages are F.PAGE tokens, so the reuse is the shared prefix rounded down to pages.

Reuse must change nothing a caller can see: tokens equal HF transformers' greedy ones, a
seeded request repeats itself exactly, logprobs equal those of a whole prefill.
"""

from __future__ import annotations

import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    return F.shared_engine()


def run(engine, prompt, params=GREEDY, max_tokens=10, **kw) -> tuple[dict, int]:
    """(the one choice's output, prompt tokens mapped from the prefix cache)."""
    F.wait_idle(engine)
    before = engine.stats()["reused_prompt_tokens"]
    request = GenerationRequest(tuple(prompt), params, max_tokens=max_tokens, ignore_eos=True, **kw)
    out = F.collect(engine.submit(request))[0]
    return out, engine.stats()["reused_prompt_tokens"] - before


def forget(engine) -> None:
    """Make every slot's cache unusable, so the next prompt is prefilled whole."""
    engine.scheduler.forget_cached()


def pages(tokens: int) -> int:
    """The tokens of the full pages among `tokens`."""
    return tokens // F.PAGE * F.PAGE


def check_shared_prefix(engine, seed: int, shared: int) -> None:
    """A prompt sharing its first `shared` tokens with the one before prefills only the
    rest, and still generates HF's greedy tokens."""
    first, other = F.prompts(2, seed=seed, lo=36, hi=36)
    second = first[:shared] + other[:14]
    run(engine, first)
    out, reused = run(engine, second)
    assert reused == pages(shared) > 0
    assert out["ids"] == F.hf_greedy(second, 10)


def test_a_shared_prefix_is_not_prefilled_again(engine):
    check_shared_prefix(engine, seed=41, shared=28)


def test_the_next_turn_reuses_the_whole_conversation(engine):
    [prompt] = F.prompts(1, seed=42, lo=20, hi=20)
    out, _ = run(engine, prompt, max_tokens=9)
    follow_up = prompt + out["ids"] + F.prompts(1, seed=43, lo=6, hi=6)[0]
    out2, reused = run(engine, follow_up)
    # Every generated token but the last was an input, so its K/V is in the pages.
    assert reused == pages(len(prompt) + 9 - 1)
    assert out2["ids"] == F.hf_greedy(follow_up, 10)


def test_reuse_changes_no_token_or_logprob(engine):
    [prompt] = F.prompts(1, seed=44, lo=40, hi=40)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=77)
    forget(engine)
    whole, reused = run(engine, prompt, seeded, max_tokens=12, top_logprobs=3)
    assert reused == 0
    again, reused = run(engine, prompt, seeded, max_tokens=12, top_logprobs=3)
    assert reused == pages(len(prompt) - 1)  # the last prompt token is the first input
    assert again["ids"] == whole["ids"] and again["logprobs"] == whole["logprobs"]
    # Part of it from the cache, the rest prefilled into new pages.
    forget(engine)
    run(engine, prompt[:24] + F.prompts(1, seed=45, lo=8, hi=8)[0])
    part, reused = run(engine, prompt, seeded, max_tokens=12, top_logprobs=3)
    assert reused == 24
    assert part["ids"] == whole["ids"]
    for a, b in zip(part["logprobs"], whole["logprobs"], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_one_page_matches_and_several_choices_share_the_prompt(engine):
    [prompt] = F.prompts(1, seed=46, lo=30, hi=30)
    forget(engine)
    run(engine, prompt)
    _, reused = run(engine, prompt[:10] + F.prompts(1, seed=47, lo=20, hi=20)[0])
    assert reused == F.PAGE  # one full page in common
    F.wait_idle(engine)
    before = engine.stats()["reused_prompt_tokens"]
    request = GenerationRequest(tuple(prompt), GREEDY, n=3, max_tokens=4, ignore_eos=True)
    outs = F.collect(engine.submit(request))
    # Mapped once for the request; its three choices then share those pages and the rest.
    assert engine.stats()["reused_prompt_tokens"] - before == pages(len(prompt) - 1)
    assert outs[0]["ids"] == outs[1]["ids"] == outs[2]["ids"] == F.hf_greedy(prompt, 4)
    stats = F.wait_idle(engine)
    assert stats["kv_pages_used"] == 0
    engine.scheduler.pages.check()


def test_xla_path_reuses_prefixes_too():
    """Without the CPU kernels (TPU, GPU, or a CPU that can't build them) the same."""
    engine = F.make_engine(max_slots=1, max_len=64, cpu_kernel=False, background_compile=False)
    try:
        check_shared_prefix(engine, seed=48, shared=25)
    finally:
        engine.close()
