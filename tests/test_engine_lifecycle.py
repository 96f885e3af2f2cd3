"""Engine lifecycle: cancellation, the bounded queue, no compilation after warm-up, and
the async stream. Same tiny model and shared engine as test_engine_generate.py."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import jax
import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import EngineOverloaded, GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    engine = F.shared_engine()
    assert F.wait_idle(engine)["active_slots"] == 0
    return engine


def test_cancelled_requests_free_their_slots(engine):
    prompts = F.prompts(10, seed=20, lo=3, hi=40)
    cancelled = 0
    for _ in range(10):
        handles = [
            engine.submit(
                GenerationRequest(
                    tuple(p),
                    SamplingParams(temperature=0.7, seed=i) if i % 2 else GREEDY,
                    n=2 if i == 3 else 1,
                    max_tokens=50,
                    ignore_eos=True,
                )
            )
            for i, p in enumerate(prompts)
        ]
        for h in handles:
            first = next(iter(h))  # mid-generation: it has produced its first tokens
            assert first.finish_reason is None
            h.cancel()
            cancelled += 1
        for h in handles:
            list(h)  # the stream ends (it may still carry tokens decoded meanwhile)
    assert cancelled == 100
    stats = F.wait_idle(engine)
    assert stats["active_slots"] == 0 and stats["queue_length"] == 0, stats
    [c] = engine.generate(prompts[0], GREEDY, max_tokens=6, ignore_eos=True)
    assert list(c.token_ids) == F.hf_greedy(prompts[0], 6)


def test_cancel_while_queued(engine):
    prompt = F.prompts(1, seed=21)[0]
    with engine.scheduler.lock:  # the loop cannot admit while we hold the lock
        hs = [
            engine.submit(GenerationRequest(tuple(prompt), GREEDY, max_tokens=30)) for _ in range(3)
        ]
        for h in hs:
            h.cancel()
    for h in hs:
        assert list(h) == []
    assert F.wait_idle(engine)["active_slots"] == 0


def test_full_queue_is_overloaded(engine):
    prompt = tuple(F.prompts(1, seed=22)[0])
    max_queue = engine.scheduler.s.max_queue
    with engine.scheduler.lock:  # nothing leaves the queue meanwhile
        queued = [
            engine.submit(GenerationRequest(prompt, GREEDY, max_tokens=4))
            for _ in range(max_queue - engine.stats()["queue_length"])
        ]
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest(prompt, GREEDY, max_tokens=4))
        for h in queued[1:]:
            h.cancel()
        # Requests cancelled while queued (clients gone) make room at once.
        late = engine.submit(GenerationRequest(prompt, GREEDY, max_tokens=4))
    assert len(list(queued[0])) >= 1  # the queue drains and serves again
    assert len(list(late)) >= 1 and all(list(h) == [] for h in queued[1:])
    assert F.wait_idle(engine)["queue_length"] == 0


def _mixed_requests(vocab: int) -> list[tuple[list[int], SamplingParams, dict]]:
    """Every kind of request the sampling state can hold, each prompt bucket and length."""
    lengths = [1, 2, 9, 17, 16, 33, 40, 60]
    params = [
        GREEDY,
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.1, min_p=0.05, top_k=20, seed=2),
        SamplingParams(temperature=0.7, typical_p=0.8, seed=3),
        SamplingParams(
            temperature=0.9,
            frequency_penalty=0.5,
            presence_penalty=-0.3,
            repetition_penalty=1.3,
            seed=4,
        ),
        SamplingParams(temperature=0.0, logit_bias={5: 10.0, 77: -100.0, vocab - 1: 3.5}),
        SamplingParams(temperature=1.0, mirostat_target=3.0, mirostat_lr=0.2, seed=5),
        SamplingParams(temperature=1.0, seed=None),
    ]
    extra = [
        {},
        {"n": 3},
        {"top_logprobs": 3},
        {"prompt_logprobs": True, "top_logprobs": 2},
        {"stop": ("e", "th")},
        {"n": 2, "top_logprobs": 0},
        {"max_tokens": 0, "prompt_logprobs": True},
        {"ignore_eos": True},
    ]
    rng = np.random.default_rng(23)
    out = []
    for i in range(16):
        L = lengths[i % len(lengths)]
        prompt = rng.integers(100, vocab, size=L).tolist()
        kw = {"max_tokens": 3 + (5 * i) % 9, **extra[(i * 3) % len(extra)]}
        out.append((prompt, params[i % len(params)], kw))
    return out


def test_idle_slots_are_not_decoded(engine):
    """Sequences take the lowest free slots and decode runs only up to a bucket above the
    highest live one: a lone request decodes a one-slot batch, three at once a four-slot
    one, whichever slots earlier requests used."""
    assert F.wait_idle(engine)["active_slots"] == 0
    [prompt] = F.prompts(1, seed=41, lo=9, hi=9)
    engine.generate(prompt, GREEDY, max_tokens=4, ignore_eos=True)
    assert engine.stats()["decode_width"] == 1
    engine.generate(F.prompts(3, seed=42), GREEDY, max_tokens=4, ignore_eos=True)
    assert engine.stats()["decode_width"] == 4
    engine.generate(F.prompts(F.SLOTS, seed=43), GREEDY, max_tokens=4, ignore_eos=True)
    assert engine.stats()["decode_width"] == F.SLOTS
    engine.generate(prompt, GREEDY, max_tokens=4, ignore_eos=True)
    assert engine.stats()["decode_width"] == 1


def _first_token_times(engine, seed: int) -> list[float]:
    """A burst of one request per slot, all queued before the loop sees any: when each
    request's first tokens arrived (one decode call delivers them to every slot it ran)."""
    with engine.scheduler.lock:  # the loop admits nothing until all are queued
        handles = [
            engine.submit(GenerationRequest(tuple(p), GREEDY, max_tokens=2, ignore_eos=True))
            for p in F.prompts(F.SLOTS, seed=seed, lo=5, hi=12)
        ]
    for h in handles:
        F.collect(h)
    return sorted(h.submitted + h.timing.time_to_first_token_s for h in handles)


def test_a_burst_is_prefilled_whole_unless_the_budget_says_otherwise(engine):
    """The default prefill budget admits the whole burst before decoding resumes, so the
    first decode call runs every slot; a budget of one token admits one request per decode
    call (at least one always goes in), and their first tokens come one call apart."""
    assert F.wait_idle(engine)["active_slots"] == 0
    firsts = _first_token_times(engine, seed=51)
    assert firsts[-1] - firsts[0] < 1e-6
    settings = engine.scheduler.s
    engine.scheduler.s = dataclasses.replace(settings, prefill_budget=1)
    try:
        firsts = _first_token_times(engine, seed=52)
    finally:
        engine.scheduler.s = settings
    assert all(b - a > 1e-6 for a, b in zip(firsts, firsts[1:], strict=False))
    assert F.wait_idle(engine)["active_slots"] == 0


def test_no_compilation_after_warmup(engine):
    events: list[str] = []
    watching = True

    def listener(name: str, duration: float, **kw) -> None:
        if watching and (
            name.endswith("backend_compile_duration") or name.endswith("jaxpr_trace_duration")
        ):
            events.append(f"{name} {kw.get('fun_name', '')}")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        requests = _mixed_requests(engine.vocab_size)
        for round_ in range(2):  # concurrently, then again into slots freed in another order
            handles = [
                engine.submit(GenerationRequest(tuple(p), sp, **kw)) for p, sp, kw in requests
            ]
            for i, h in enumerate(handles):
                if round_ and i % 5 == 0:
                    h.cancel()
                F.collect(h)
            requests = requests[::-1]
        assert F.wait_idle(engine)["active_slots"] == 0
    finally:
        watching = False
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []


def test_async_stream_and_early_exit_cancels(engine):
    prompt = F.prompts(1, seed=24, lo=11, hi=11)[0]

    async def main():
        ids = []
        async for u in engine.stream(prompt, GREEDY, max_tokens=20, ignore_eos=True):
            ids += u.token_ids
            last = u
        assert last.finish_reason == "length"

        # Several streams at once on one event loop.
        async def one(seed):
            out = []
            sp = SamplingParams(temperature=1.0, seed=seed)
            async for u in engine.stream(prompt, sp, max_tokens=12, ignore_eos=True):
                out += u.token_ids
            return out

        many = await asyncio.gather(*(one(s) for s in range(6)))

        stream = engine.stream(prompt, GREEDY, max_tokens=50, ignore_eos=True)
        async for _ in stream:
            break  # leaving early cancels the request
        await stream.aclose()
        for _ in range(500):
            if engine.stats()["active_slots"] == 0:
                break
            await asyncio.sleep(0.01)
        return ids, many, engine.stats()

    ids, many, stats = asyncio.run(main())
    assert ids == F.hf_greedy(prompt, 20)
    assert all(len(m) == 12 for m in many) and len({tuple(m) for m in many}) == 6
    assert stats["active_slots"] == 0


def test_sync_generate_inside_running_loop_and_threads(engine):
    """A notebook calls generate() from a thread with a running event loop; research
    scripts call it from many threads at once."""
    prompt = F.prompts(1, seed=25, lo=6, hi=6)[0]
    expected = F.hf_greedy(prompt, 5)

    async def inside_loop():
        return engine.generate(prompt, GREEDY, max_tokens=5, ignore_eos=True)

    [c] = asyncio.run(inside_loop())
    assert list(c.token_ids) == expected

    results: list = []

    def worker():
        results.extend(engine.generate([prompt] * 2, GREEDY, max_tokens=5, ignore_eos=True))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [list(c.token_ids) for c in results] == [expected] * 8


def test_prompts_pad_by_less_than_half_their_length_to_their_prefill_bucket():
    from engine.buckets import bucket_for, buckets

    sizes = buckets(16, 3000, midpoints=True)
    assert sizes[:4] == [16, 24, 32, 48] and sizes[-1] == 3000
    for n in range(17, 3001):
        assert n <= bucket_for(n, sizes) < n * 1.5
