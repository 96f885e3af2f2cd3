"""Warm-up: a lone request's decode program (and the full-width one) compile before the engine
serves; what is left compiles in the background one program at a time and only while the
engine is idle, counted by stats()["programs_pending"]."""

from __future__ import annotations

import threading
import time

import pytest

from engine.warmup import Later
from tests import engine_fixtures as F

pytest.importorskip("torch")


def test_later_compiles_only_while_idle_and_counts_what_is_pending():
    done: list[int] = []
    idle = threading.Event()
    closing = threading.Event()
    later = Later([lambda i=i: done.append(i) for i in range(3)], idle.is_set, closing, 0.2)
    thread = threading.Thread(target=later.run)
    thread.start()
    time.sleep(0.3)
    assert done == [] and later.pending == 3  # busy: nothing compiles
    idle.set()
    thread.join(5)
    assert done == [0, 1, 2] and later.pending == 0


def test_closing_stops_the_background_between_programs():
    closing = threading.Event()
    ran: list[int] = []

    def job(i: int) -> None:
        ran.append(i)
        closing.set()  # the engine closes while this one compiles

    later = Later([lambda i=i: job(i) for i in range(3)], lambda: True, closing, 0.0)
    later.run()
    assert ran == [0] and later.pending == 2


def test_a_lone_request_runs_on_its_own_program_from_the_start():
    """Before from_pretrained returns, the one-slot and the all-slot decode programs are
    compiled; the rest follows while idle, and a lone request decodes one slot."""
    engine = F.make_engine(max_slots=4, max_len=64)
    try:
        s = engine.scheduler
        k, kv = s.s.decode_steps, s.kv_buckets[0]
        assert engine.programs.decode_ready(k, kv, 1)
        assert engine.programs.decode_ready(k, kv, s.slot_buckets[-1])
        [prompt] = F.prompts(1, seed=61)
        [c] = engine.generate(prompt, max_tokens=8, ignore_eos=True)
        assert engine.stats()["decode_width"] == 1
        deadline = time.monotonic() + 300
        while engine.stats()["programs_pending"]:
            assert time.monotonic() < deadline, "the background never finished while idle"
            time.sleep(0.1)
        assert engine.programs.decode_ready(k, kv, 2)
    finally:
        engine.close()


def test_a_scored_bucket_compiled_ahead_is_served_without_compiling_again():
    """compile_prefill compiles a long scored prompt's programs on throwaway jits (so they
    do not stay in memory) with the placements the served calls have: those calls find each
    program (in the persistent cache) instead of compiling it again."""
    import jax
    import numpy as np

    engine = F.make_engine(max_slots=2, max_len=64, warmup=False)
    try:
        s, p = engine.scheduler, engine.programs
        T = 37  # no bucket: only this test compiles programs for it
        events: list[str] = []

        def on_event(event: str, **_: object) -> None:
            if event.startswith("/jax/compilation_cache/cache_"):
                events.append(event)

        jax.monitoring.register_event_listener(on_event)
        try:
            p.compile_prefill(s.params, s.cache, T)
            # Three programs compiled through the persistent cache (a miss each, unless an
            # earlier run of this test in the same cache folder wrote them).
            assert len(events) == 3
            events.clear()
            tokens = np.ones((1, T), np.int32)
            rows, hidden = p.prefill(s.params, tokens, np.int32(T))
            s.cache = p.insert(s.cache, rows, np.zeros(p.pages_per_seq, np.int32))
            jax.block_until_ready(p.prompt_logprobs(s.params, hidden, tokens))
        finally:
            jax.monitoring.unregister_event_listener(on_event)
        assert "/jax/compilation_cache/cache_misses" not in events
    finally:
        engine.close()
