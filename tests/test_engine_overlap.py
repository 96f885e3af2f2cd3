"""The scheduler runs one decode call ahead of the host, with a scripted device program.

`ScriptedPrograms` is engine.step.Programs without a model (the narrow contract the scheduler
drives, as JetStream's mock engine): K/V programs leave the cache as it is, and a decode step
draws NEXT[input token] for every live row through the same slot, EOS and max_tokens
bookkeeping as the real one. So each request's tokens are known, and the test drives the
loop by hand (Scheduler.step), recording when each call is dispatched and when it is read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine.admission import Limits
from engine.config import ModelConfig
from engine.decode_state import StepOutput
from engine.paging import PAD_PAGE
from engine.requests import GenerationRequest, SamplingParams
from engine.scheduler import Scheduler, SchedulerSettings
from engine.sharded_pages import ShardedPages
from engine.step import Programs
from serving.testing import EOS, FakeTokenizer
from tests.tiny_config import TINY

VOCAB, PAGE, MAX_LEN, K = FakeTokenizer.vocab_size, 4, 64, 4
# Each byte's successor is the next byte; "m" is followed by EOS, EOS by "a".
NEXT = np.arange(1, VOCAB + 1) % VOCAB
NEXT[ord("m")], NEXT[EOS] = EOS, ord("a")


class ScriptedPrograms(Programs):
    def __init__(self, events: list[tuple[str, int]]):
        config = ModelConfig.from_hf(
            {**TINY, "vocab_size": VOCAB, "architectures": ["LlamaForCausalLM"]}
        )
        super().__init__(config, jnp.float32, 2, [EOS], pages_per_seq=MAX_LEN // PAGE)
        self.events, self.outputs = events, []  # every call's StepOutput, in order
        self.prefill = lambda params, tokens, length: (None, None)
        self.insert = lambda cache, rows, pages: cache
        self.next = jnp.asarray(NEXT, jnp.int32)

    def extend_ready(self, tokens: int, rows: int = 1) -> bool:
        return True

    def extender(self, params, cache, tokens: int, rows: int = 1):
        return lambda params, cache, *rest: cache

    def decoder(self, params, cache, state, *, k, kv_len, rows, chunk=0):
        assert chunk == 0, "no prompt here is long enough to be chunked"
        masks = self.masks_shape(rows)
        program = jax.jit(self._scripted, static_argnames=("k", "rows"), donate_argnums=2)
        steps = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = program.lower(params, cache, state, masks, steps, k=k, rows=rows).compile()
        return Recorded(self, compiled, k)

    def _scripted(self, params, cache, state, masks, steps, *, k: int, rows: int):
        def step(st, i):
            live = st.active & (i < steps)
            tokens = self.next[st.tokens]
            remaining = st.remaining - live.astype(jnp.int32)
            eos = (tokens == EOS) & st.stop_on_eos
            finished = live & (eos | (remaining <= 0))
            zeros = jnp.zeros(tokens.shape, jnp.float32)
            top = jnp.zeros((*tokens.shape, self.num_top), jnp.int32)
            out = StepOutput(tokens, zeros, zeros, top, top.astype(jnp.float32), live, finished)
            st = st.replace(
                tokens=jnp.where(live, tokens, st.tokens),
                positions=st.positions + live.astype(jnp.int32),
                active=st.active & ~finished,
                remaining=remaining,
            )
            return st, out

        head = jax.tree.map(lambda x: x[:rows], state)
        head, outputs = jax.lax.scan(step, head, jnp.arange(k))
        state = jax.tree.map(lambda full, part: full.at[:rows].set(part), state, head)
        return cache, state, outputs


@dataclasses.dataclass
class Recorded:
    """A compiled scripted decode that records its dispatches and checks, before each, that
    every position it will write has a page (not the pad page) in the row's table."""

    programs: ScriptedPrograms
    compiled: object
    k: int

    @property
    def input_shardings(self):
        return self.compiled.input_shardings

    def __call__(self, params, cache, state, masks, steps):
        # Waits for the call before (the test checks the order of calls, not their timing).
        table, positions, active = (
            np.asarray(x) for x in (state.page_table, state.positions, state.active)
        )
        for row in range(masks.shape[0]):
            if (table[row] == PAD_PAGE).all():
                continue  # a free slot: its writes land in the pad page
            last = positions[row] + (int(steps) - 1 if active[row] else 0)
            for p in range(positions[row], min(last, MAX_LEN - 1) + 1):
                assert table[row, p // PAGE] != PAD_PAGE, (row, p)
        cache, state, out = self.compiled(params, cache, state, masks, steps)
        self.programs.events.append(("dispatch", len(self.programs.outputs)))
        self.programs.outputs.append(out)
        return cache, state, out


def make_scheduler(monkeypatch, events: list, pages: int = 8 * MAX_LEN // PAGE + 1) -> Scheduler:
    programs = ScriptedPrograms(events)
    real = jax.device_get

    def device_get(tree):
        call = next((i for i, out in enumerate(programs.outputs) if out is tree), None)
        if call is not None:
            events.append(("read", call))
        return real(tree)

    monkeypatch.setattr(jax, "device_get", device_get)
    cache = [(jnp.zeros((pages, 1)), jnp.zeros((pages, 1)))]
    settings = SchedulerSettings(max_slots=8, max_len=MAX_LEN, decode_steps=K)
    limits = Limits(vocab_size=VOCAB, context_window=MAX_LEN, max_top_logprobs=2, max_logit_bias=8)
    return Scheduler(
        programs, None, cache, ShardedPages(pages, PAGE), FakeTokenizer(), settings, limits
    )


def requests() -> list[GenerationRequest]:
    greedy, a, n = SamplingParams(temperature=0.0), tuple(b"xa"), tuple(b"xn")
    return [
        GenerationRequest(a, greedy),  # b .. m, then EOS
        GenerationRequest(a, greedy, stop=("fg",)),
        GenerationRequest(n, greedy, max_tokens=30, top_logprobs=2),
        GenerationRequest(a, greedy, max_tokens=20, ignore_eos=True),
        GenerationRequest(a, greedy, n=2, stop=("ij",), top_logprobs=1),
    ]


def run(sched: Scheduler) -> list[list]:
    """Every request of `requests()` submitted at once, the loop driven to idle; each
    handle's updates."""
    handles = [sched.submit(r) for r in requests()]
    while sched._busy() or sched.inbox:
        sched.step()
    return [list(h) for h in handles]


def test_tokens_after_an_end_never_reach_the_client(monkeypatch):
    events: list[tuple[str, int]] = []
    sched = make_scheduler(monkeypatch, events)
    ahead = run(sched)
    # Every call after the first is dispatched before its predecessor is read, until the
    # last one, after which nothing may still decode.
    calls = max(i for _, i in events) + 1
    expected = [("dispatch", 0)]
    for i in range(1, calls):
        expected += [("dispatch", i), ("read", i - 1)]
    assert events == expected + [("read", calls - 1)]

    events.clear()
    monkeypatch.setattr(sched, "_run_ahead", lambda: False)
    synced = run(sched)
    assert [e[0] for e in events[:3]] == ["dispatch", "read", "dispatch"]
    assert ahead == synced  # the same updates, one by one

    def joined(updates, index=0):
        mine = [u for u in updates if u.index == index]
        assert [u.finish_reason for u in mine[:-1]] == [None] * (len(mine) - 1)
        ids = [t for u in mine for t in u.token_ids]
        logprobs = [e for u in mine for e in u.logprobs or ()]
        return bytes(t for t in ids if t < 256), "".join(u.text for u in mine), mine[-1], logprobs

    eos, stop, length, ignore, choices = ahead
    assert joined(eos)[:2] == (b"bcdefghijklm", "bcdefghijklm")
    assert joined(eos)[2].finish_reason == "stop" and joined(eos)[2].token_ids[-1] == EOS
    assert joined(stop)[:2] == (b"bcdefg", "bcde") and joined(stop)[2].finish_reason == "stop"
    ids, text, last, logprobs = joined(length)
    assert len(ids) == 30 and last.finish_reason == "length" and len(logprobs) == 30
    ids, text, last, _ = joined(ignore)
    assert text == "bcdefghijklmabcdefg" and last.finish_reason == "length"
    for i in range(2):
        ids, text, last, logprobs = joined(choices, i)
        assert (ids, text, last.finish_reason, len(logprobs)) == (
            b"bcdefghij",
            "bcdefgh",
            "stop",
            9,
        )
    sched.pages.check()
    assert sched.pages.used_pages == 0 and len(sched.free) == 8


def test_a_short_pool_preempts_as_the_plain_loop_does(monkeypatch):
    """With too few pages for every sequence, running ahead gives way to the synchronised
    loop, which preempts; the updates are those of the loop that never runs ahead."""
    events: list[tuple[str, int]] = []
    ahead = make_scheduler(monkeypatch, events, pages=13)
    ahead_out = run(ahead)
    assert ahead.preemptions > 0
    synced = make_scheduler(monkeypatch, events, pages=13)
    monkeypatch.setattr(synced, "_run_ahead", lambda: False)
    assert run(synced) == ahead_out
