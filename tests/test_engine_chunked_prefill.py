"""A prompt longer than the prefill chunk is prefilled into its pages a chunk per loop
iteration, and the sequences already decoding get tokens between two chunks.

Chunking must change nothing a caller sees: greedy tokens equal HF transformers', a seeded
request's tokens and logprobs equal those of a whole prefill; a request cancelled halfway
through its prefill frees its pages (the chunks done stay in the prefix cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
CHUNK = 16


@pytest.fixture(scope="module")
def engine():
    return F.shared_engine()


@pytest.fixture(scope="module")
def xla_engine():
    """XLA's ops (TPU, GPU, or a CPU without the kernels): where chunks ride in decode calls."""
    engine = F.make_engine(max_slots=2, cpu_kernel=False, background_compile=False)
    yield engine
    engine.close()


@contextlib.contextmanager
def chunk(engine, size: int, mixed: bool = False):
    """Prompts chunked by `size` tokens; `mixed`: each chunk rides in the decode call of the
    sequences decoding (compiled on first use), else it runs alone before that call."""
    sched = engine.scheduler
    settings, on_demand = sched.s, sched.compile_on_demand
    sched.s = dataclasses.replace(settings, max_num_batched_tokens=size)
    sched.compile_on_demand = mixed
    try:
        yield
    finally:
        sched.s, sched.compile_on_demand = settings, on_demand


def run(engine, prompt, params=GREEDY, **kw) -> dict:
    F.wait_idle(engine)
    engine.scheduler.forget_cached()  # no prefix reuse: the whole prompt is prefilled
    request = GenerationRequest(tuple(prompt), params, ignore_eos=True, **kw)
    return F.collect(engine.submit(request))[0]


def test_chunked_prompt_gives_hf_greedy_tokens(engine):
    [prompt] = F.prompts(1, seed=61, lo=50, hi=50)  # 49 prefilled: chunks of 16, 16, 16, 1
    with chunk(engine, CHUNK):
        out = run(engine, prompt, max_tokens=8)
    assert out["ids"] == F.hf_greedy(prompt, 8)


def test_chunked_equals_whole_prefill(engine):
    [prompt] = F.prompts(1, seed=62, lo=45, hi=45)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    whole = run(engine, prompt, seeded, max_tokens=10, top_logprobs=3)
    with chunk(engine, CHUNK):
        chunked = run(engine, prompt, seeded, max_tokens=10, top_logprobs=3)
    assert chunked["ids"] == whole["ids"]
    for a, b in zip(chunked["logprobs"], whole["logprobs"], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_running_streams_decode_between_chunks(engine, monkeypatch):
    """The scheduler's device calls, in order: while a long prompt is prefilled chunk by
    chunk, a decode call of the running sequence comes between every two chunks."""
    sched = engine.scheduler
    calls: list[str] = []
    compute, decode = sched._compute, sched._decode
    monkeypatch.setattr(sched, "_compute", lambda *a: (calls.append("chunk"), compute(*a))[1])
    monkeypatch.setattr(sched, "_decode", lambda: (calls.append("decode"), decode())[1])
    [short, long] = F.prompts(2, seed=63, lo=5, hi=60)
    F.wait_idle(engine)
    with chunk(engine, CHUNK):
        # Admitted in one loop iteration: the short one decodes at once, and its 56 tokens
        # (7 calls) outlast the long one's 4 chunks however slowly this thread runs (it
        # used to submit the long one after the first token, and under load lost the race).
        with sched.lock:
            running = engine.submit(
                GenerationRequest(tuple(short), GREEDY, max_tokens=56, ignore_eos=True)
            )
            pending = engine.submit(GenerationRequest(tuple(long), GREEDY, max_tokens=4))
        long_out = F.collect(pending)
        F.collect(running)
    assert long_out[0]["ids"] == F.hf_greedy(long, 4)
    started = calls.index("decode")  # the short prompt's own prefill comes before
    chunks = [i for i, c in enumerate(calls) if c == "chunk" and i > started]
    assert len(chunks) == 4  # 59 prompt tokens before the last: 16 + 16 + 16 + 11
    assert all("decode" in calls[a:b] for a, b in zip(chunks, chunks[1:], strict=False))


def decode_with_a_long_prompt(engine, mixed: bool, params=GREEDY) -> tuple[dict, dict]:
    """A 59-token prompt arrives while another sequence decodes; both outputs."""
    [short, long] = F.prompts(2, seed=68, lo=5, hi=60)
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    sched = engine.scheduler
    with chunk(engine, CHUNK, mixed):
        with sched.lock:  # admitted in one loop iteration: the short one decodes at once
            running = engine.submit(
                GenerationRequest(
                    tuple(short), params, max_tokens=40, ignore_eos=True, top_logprobs=2
                )
            )
            request = GenerationRequest(
                tuple(long), params, max_tokens=4, ignore_eos=True, top_logprobs=2
            )
            waiting = engine.submit(request)
        return F.collect(running)[0], F.collect(waiting)[0]


def test_chunks_ride_in_the_decode_calls(xla_engine, monkeypatch):
    """Mixed steps: once the short sequence decodes, each chunk of the long prompt is
    computed by a decode call (rows 1, so 15 prompt tokens each: 15 + 15 + 15 + 14), none
    alone, and both outputs are HF's greedy tokens."""
    engine = xla_engine
    sched = engine.scheduler
    chunks: list[int] = []
    alone: list[int] = []
    decoder, compute = sched.p.decoder, sched._compute
    monkeypatch.setattr(
        sched.p, "decoder", lambda *a, **kw: (chunks.append(kw["chunk"]), decoder(*a, **kw))[1]
    )
    monkeypatch.setattr(sched, "_compute", lambda f, n: (alone.append(n), compute(f, n))[1])
    running, long = decode_with_a_long_prompt(engine, mixed=True)
    assert [c for c in chunks if c] == [15] * 4
    assert alone == [4]  # the short prompt's own prefill
    assert long["ids"] == F.hf_greedy(F.prompts(2, seed=68, lo=5, hi=60)[1], 4)
    assert running["ids"] == F.hf_greedy(F.prompts(2, seed=68, lo=5, hi=60)[0], 40)


def test_mixed_steps_equal_chunks_alone(xla_engine):
    """Seeded sampling with logprobs: a chunk riding in a decode call changes nothing in
    either sequence's tokens or logprobs."""
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    mixed = decode_with_a_long_prompt(xla_engine, True, seeded)
    alone = decode_with_a_long_prompt(xla_engine, False, seeded)
    for a, b in zip(mixed, alone, strict=True):
        assert a["ids"] == b["ids"]
        for x, y in zip(a["logprobs"], b["logprobs"], strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_cancel_while_prefilling_frees_the_pages(engine):
    [prompt] = F.prompts(1, seed=64, lo=60, hi=60)
    F.wait_idle(engine)
    sched = engine.scheduler
    started = threading.Event()
    compute = sched._compute

    def cancelling_compute(fill, n):
        started.set()
        fill.owner.handle.cancel()  # the client goes away after the first chunk
        compute(fill, n)

    sched._compute = cancelling_compute
    try:
        with chunk(engine, CHUNK):
            handle = engine.submit(GenerationRequest(tuple(prompt), GREEDY, max_tokens=4))
            assert F.collect(handle) == {}
    finally:
        del sched._compute
    assert started.is_set()
    stats = F.wait_idle(engine)
    assert stats["active_slots"] == 0 and stats["kv_pages_used"] == 0 and not sched.filling
    sched.pages.check()
    # The prefix cache holds the chunk that was prefilled: the same prompt reuses it.
    before = engine.stats()["reused_prompt_tokens"]
    request = GenerationRequest(tuple(prompt), GREEDY, max_tokens=4, ignore_eos=True)
    out = F.collect(engine.submit(request))[0]
    assert engine.stats()["reused_prompt_tokens"] - before == CHUNK
    assert out["ids"] == F.hf_greedy(prompt, 4)


def test_xla_path_chunks_too(xla_engine):
    """Without the CPU kernels (TPU, GPU, or a CPU that can't build them) the same."""
    [prompt] = F.prompts(1, seed=65, lo=40, hi=40)
    request = GenerationRequest(tuple(prompt), GREEDY, max_tokens=6, ignore_eos=True)
    with chunk(xla_engine, CHUNK):
        assert F.collect(xla_engine.submit(request))[0]["ids"] == F.hf_greedy(prompt, 6)


def test_the_cpu_kernels_run_chunks_alone(engine, monkeypatch):
    """On the CPU kernels a chunk costs its compute, not the weight reads a mixed step
    would share: no mixed program is compiled, even on demand; each chunk goes alone."""
    sched = engine.scheduler
    assert not sched.p.mixes_chunks
    carried: list[int] = []
    decoder = sched.p.decoder
    monkeypatch.setattr(
        sched.p,
        "decoder",
        lambda *a, **kw: (carried.append(kw.get("chunk", 0)), decoder(*a, **kw))[1],
    )
    running, long = decode_with_a_long_prompt(engine, mixed=True)
    assert carried and not any(carried)
    [short, prompt] = F.prompts(2, seed=68, lo=5, hi=60)
    assert running["ids"] == F.hf_greedy(short, 40)
    assert long["ids"] == F.hf_greedy(prompt, 4)


def test_a_prompt_prefilled_beside_a_decoding_sequence_keeps_its_pages(engine):
    """A long prompt mapping cached pages is chunked while another sequence decodes in
    slot 1, slot 0 (idle, inside the decode width) writing into the pad page only: were
    its page-table row left pointing at the pages it freed, each decode step would write
    over the positions being prefilled into them."""
    [a, b, fresh] = F.prompts(3, seed=66, lo=24, hi=30)
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    with chunk(engine, CHUNK):
        first = engine.submit(GenerationRequest(tuple(a), GREEDY, max_tokens=2, ignore_eos=True))
        running = engine.submit(GenerationRequest(tuple(b), GREEDY, max_tokens=30, ignore_eos=True))
        F.collect(first)  # slot 0 is free again, a's full pages cached
        prompt = a[:24] + fresh  # reuses 24 (three pages), then 33 more tokens: three chunks
        before = engine.stats()["reused_prompt_tokens"]
        out = F.collect(engine.submit(GenerationRequest(tuple(prompt), GREEDY, max_tokens=6)))
        assert engine.stats()["reused_prompt_tokens"] - before == 24
        assert F.collect(running)[0]["ids"] == F.hf_greedy(b, 30)
    assert out[0]["ids"] == F.hf_greedy(prompt, 6)


def test_failed_programs_leave_no_slot_taken(engine, monkeypatch):
    """A program that fails while a prompt goes into its pages or its slot ends that
    request with the error and gives every slot and page back."""
    sched = engine.scheduler
    [prompt] = F.prompts(1, seed=67, lo=40, hi=40)
    for name in ("extender", "start_slot"):
        F.wait_idle(engine)
        real = getattr(sched.p, name)
        calls = []

        def failing(*args, real=real, calls=calls, name=name):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError(f"injected {name} fault")
            return real(*args)

        monkeypatch.setattr(sched.p, name, failing)
        with chunk(engine, CHUNK):
            handle = engine.submit(GenerationRequest(tuple(prompt), GREEDY, max_tokens=3))
            with pytest.raises(RuntimeError, match="injected"):
                F.collect(handle)
        monkeypatch.undo()
        stats = F.wait_idle(engine)
        assert stats["active_slots"] == 0 and stats["kv_pages_used"] == 0
        assert not sched.filling and not sched.live
        sched.pages.check()
        out = F.collect(engine.submit(GenerationRequest(tuple(prompt), GREEDY, max_tokens=3)))
        assert out[0]["ids"] == F.hf_greedy(prompt, 3)


def test_warmup_compiles_the_mixed_step(monkeypatch):
    """A server's path on XLA's ops: warm-up compiles a mixed program, serving carries chunks in it
    (compiling nothing on demand) and compiles nothing else either."""
    engine = F.make_engine(
        max_len=64, cpu_kernel=False, background_compile=False, max_num_batched_tokens=CHUNK
    )
    events: list[str] = []
    carried: list[int] = []
    sched = engine.scheduler
    decoder = sched.p.decoder
    monkeypatch.setattr(
        sched.p, "decoder", lambda *a, **kw: (carried.append(kw["chunk"]), decoder(*a, **kw))[1]
    )

    def listener(name: str, duration: float, **kw) -> None:
        if name.endswith("backend_compile_duration"):
            events.append(kw.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        running, long = decode_with_a_long_prompt(engine, mixed=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        engine.close()
    assert not sched.compile_on_demand and events == []
    assert [c for c in carried if c] == [CHUNK - 4] * 5  # the widest rows' program: 12 each
    [short, prompt] = F.prompts(2, seed=68, lo=5, hi=60)
    assert running["ids"] == F.hf_greedy(short, 40)
    assert long["ids"] == F.hf_greedy(prompt, 4)
