"""A KV cache pool smaller than the load: admission waits for pages, decoding sequences that
run out of pages are preempted (the latest started first) and recomputed later, and no
caller can tell — tokens, logprobs and seeded draws equal those of a pool that never runs
short. Choices of one prompt share its pages, copy-on-write for the partly filled last one.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.paging import bytes_per_page  # noqa: E402
from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
# Penalties, bias and mirostat keep state per sequence (counts, mu, the draw counter): a
# resumed sequence must carry on from it, not from a fresh row.
STATEFUL = [
    SamplingParams(temperature=1.0, top_p=0.9, seed=11, frequency_penalty=0.5),
    SamplingParams(temperature=0.8, seed=12, presence_penalty=0.7, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, seed=13, mirostat_target=3.0, mirostat_lr=0.2),
    GREEDY,
]


@pytest.fixture(scope="module")
def big():
    return F.shared_engine()


@pytest.fixture(scope="module")
def small():
    """Room for 11 pages of 8 tokens: one full sequence (64 tokens) and a bit, while the
    load below needs about 4 x 6 pages at once."""
    engine = F.make_engine(
        max_slots=4, max_len=F.MAX_LEN, kv_cache_memory=budget_of(12), background_compile=False
    )
    yield engine
    engine.close()


def run_all(engine, requests: list[GenerationRequest]) -> list[dict]:
    handles = [engine.submit(r) for r in requests]
    return [F.collect(h) for h in handles]


def load(seed: int) -> list[GenerationRequest]:
    prompts = F.prompts(4, seed=seed, lo=14, hi=22)
    return [
        GenerationRequest(tuple(p), params, max_tokens=26, ignore_eos=True, top_logprobs=2)
        for p, params in zip(prompts, STATEFUL, strict=True)
    ]


def test_a_pool_too_small_for_the_load_gives_the_same_tokens(big, small):
    before = small.stats()["preemptions"]
    want = run_all(big, load(seed=81))
    got = run_all(small, load(seed=81))
    assert small.stats()["preemptions"] > before  # the pool really ran short
    for g, w in zip(got, want, strict=True):
        assert g[0]["ids"] == w[0]["ids"]
        assert "".join(g[0]["deltas"]) == "".join(w[0]["deltas"])
        for a, b in zip(g[0]["logprobs"], w[0]["logprobs"], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    stats = F.wait_idle(small)
    assert stats["kv_pages_used"] == 0 and stats["active_slots"] == 0
    small.scheduler.pages.check()


def test_greedy_equals_hf_under_preemption(small):
    prompts = F.prompts(4, seed=82, lo=20, hi=30)
    requests = [
        GenerationRequest(tuple(p), GREEDY, max_tokens=24, ignore_eos=True) for p in prompts
    ]
    for out, prompt in zip(run_all(small, requests), prompts, strict=True):
        assert out[0]["ids"] == F.hf_greedy(prompt, 24)


def test_cancelling_during_preemption_leaks_nothing(small):
    """Requests cancelled at random moments, some while preempted or waiting for pages:
    every page and slot is free again, the pool's invariants hold."""
    rng = np.random.default_rng(83)
    prompts = F.prompts(10, seed=83, lo=5, hi=40)
    handles = [
        small.submit(GenerationRequest(tuple(p), GREEDY, max_tokens=int(rng.integers(1, 24))))
        for p in prompts
    ]
    timers = [threading.Timer(float(rng.uniform(0, 0.5)), h.cancel) for h in handles[::2]]
    for t in timers:
        t.start()
    for h in handles:
        F.collect(h)
    for t in timers:
        t.join()
    stats = F.wait_idle(small)
    assert stats["kv_pages_used"] == 0 and stats["active_slots"] == 0
    small.scheduler.pages.check()
    assert not (small.scheduler.filling or small.scheduler.ready or small.scheduler.resumes)


def test_choices_share_the_prompt_pages_and_each_sees_only_its_own(big):
    """n = 3 seeded choices of a prompt whose last page is partly filled: each choice's
    logprobs equal HF's over its own prompt + tokens, so no choice attended to a sibling's
    K/V in the page they shared (copy-on-write before the first write)."""
    [prompt] = F.prompts(1, seed=84, lo=21, hi=21)  # 20 prefilled: 2 full pages + 4
    params = SamplingParams(temperature=1.0, seed=85)
    request = GenerationRequest(
        tuple(prompt), params, n=3, max_tokens=12, ignore_eos=True, top_logprobs=0
    )
    outs = F.collect(big.submit(request))
    assert len({tuple(o["ids"]) for o in outs.values()}) == 3  # three different samples
    for out in outs.values():
        want = F.hf_logprobs(prompt + out["ids"])
        P = len(prompt)
        for i, (tok, entry) in enumerate(zip(out["ids"], out["logprobs"], strict=True)):
            assert entry.logprob == pytest.approx(float(want[P - 1 + i, tok]), abs=1e-4)
    stats = F.wait_idle(big)
    assert stats["kv_pages_used"] == 0
    big.scheduler.pages.check()


def test_admission_waits_for_pages_rather_than_failing(small):
    """More prompt tokens queued at once than the pool holds: every request still ends with
    its full output."""
    prompts = F.prompts(6, seed=86, lo=40, hi=60)
    requests = [GenerationRequest(tuple(p), GREEDY, max_tokens=3, ignore_eos=True) for p in prompts]
    for out, prompt in zip(run_all(small, requests), prompts, strict=True):
        assert out[0]["ids"] == F.hf_greedy(prompt, 3)


def test_eviction_under_pressure_keeps_results_identical(small):
    """A prompt's pages are cached, evicted by a load that needs the whole pool, then
    recomputed: the same tokens each time; the cached run maps its full pages."""
    [prompt] = F.prompts(1, seed=87, lo=30, hi=30)
    request = GenerationRequest(tuple(prompt), GREEDY, max_tokens=8, ignore_eos=True)
    small.scheduler.forget_cached()
    cold = F.collect(small.submit(request))[0]["ids"]
    before = small.stats()["reused_prompt_tokens"]
    warm = F.collect(small.submit(request))[0]["ids"]
    assert small.stats()["reused_prompt_tokens"] - before == 24  # 3 full pages of 29
    run_all(small, load(seed=88))  # needs every page: the cached ones are evicted
    before = small.stats()["reused_prompt_tokens"]
    evicted = F.collect(small.submit(request))[0]["ids"]
    assert small.stats()["reused_prompt_tokens"] - before == 0
    assert cold == warm == evicted == F.hf_greedy(prompt, 8)


def test_the_pool_is_sized_by_the_budget_not_by_max_len():
    """Under the same budget, a longer context takes no more memory: the pool holds the
    same pages (startup memory does not grow with max_len past the budget)."""
    engines = [
        F.make_engine(max_slots=4, max_len=n, kv_cache_memory=budget_of(40), warmup=False)
        for n in (128, 256)
    ]
    try:
        assert [e.stats()["kv_pages"] for e in engines] == [39, 39]
        assert [e.max_context for e in engines] == [128, 256]
    finally:
        for e in engines:
            e.close()


def budget_of(pages: int) -> int:
    config = F.shared_engine().config
    return pages * bytes_per_page(
        config.num_layers, config.num_kv_heads, config.head_dim, 4, F.PAGE
    )


@pytest.fixture(scope="module")
def xla_pair():
    """XLA's ops, where chunks ride in decode calls: a large pool and a small one."""
    kw = dict(max_slots=4, max_len=F.MAX_LEN, cpu_kernel=False, background_compile=False)
    engines = F.make_engine(**kw), F.make_engine(**kw, kv_cache_memory=budget_of(12))
    yield engines
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("path", ["cpu_kernels", "xla"])
def test_chunks_under_preemption_give_the_same_tokens(path, big, small, xla_pair, monkeypatch):
    """Prompts longer than the token budget are prefilled chunk by chunk (riding in the
    decode calls on XLA's ops, alone between them on the CPU kernels) while the pool runs
    short (a preempted sequence's recompute is chunked too): still the tokens and logprobs
    of a large pool prefilling every prompt whole."""
    if path == "xla":
        big, small = xla_pair
    sched = small.scheduler
    settings, on_demand = sched.s, sched.compile_on_demand
    prompts = F.prompts(4, seed=83, lo=26, hi=36)
    requests = [
        GenerationRequest(tuple(p), params, max_tokens=24, ignore_eos=True, top_logprobs=2)
        for p, params in zip(prompts, STATEFUL, strict=True)
    ]
    want = run_all(big, requests)
    F.wait_idle(small)
    before = small.stats()["preemptions"]
    sched.s = dataclasses.replace(settings, max_num_batched_tokens=12)
    sched.compile_on_demand = True
    carried: list[int] = []
    alone: list[int] = []
    decoder, compute = sched.p.decoder, sched._compute
    monkeypatch.setattr(
        sched.p, "decoder", lambda *a, **kw: (carried.append(kw["chunk"]), decoder(*a, **kw))[1]
    )
    monkeypatch.setattr(sched, "_compute", lambda f, n: (alone.append(n), compute(f, n))[1])
    try:
        got = run_all(small, requests)
    finally:
        sched.s, sched.compile_on_demand = settings, on_demand
    assert small.stats()["preemptions"] > before
    if path == "xla":
        assert sum(1 for c in carried if c) >= 4  # chunks rode in decode calls
    else:
        assert not any(carried) and sum(1 for n in alone if n == 12) >= 4  # chunks alone
    for g, w in zip(got, want, strict=True):
        assert g[0]["ids"] == w[0]["ids"]
        for a, b in zip(g[0]["logprobs"], w[0]["logprobs"], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    stats = F.wait_idle(small)
    assert stats["kv_pages_used"] == 0 and stats["active_slots"] == 0
    sched.pages.check()
