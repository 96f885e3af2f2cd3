"""Decode calls: dispatching one, reading its tokens back, and running one call ahead.

A decode call (engine.step) runs k steps of every decoding slot; the host then reads its
tokens and turns them into text, stop checks and finish reasons (engine.sequences.advance).
JAX dispatches a call without waiting for it, and the decode state (each slot's next input,
position and sampling state) flows on the device from one call's outputs into the next
call's inputs. So in the steady state of plain decoding the next call is dispatched before
the host reads the one in flight: the device computes call N+1 while the host does call N's
work. With a grammar-constrained choice live, calls take one token and come in two programs
(engine.split_step): call N+1's forward is dispatched, then call N is read and the masks of
N+1 filled from its tokens while that forward runs, then N+1's sampling step. Anything else
(an admission, a prompt chunk, a preemption, a cancellation, which all depend on what call N
drew) synchronises: read call N, decide, dispatch.

What ends in call N still rides in call N+1. A slot the device ended (EOS, max_tokens) sits
idle there; one the host ended (a stop string) draws more tokens, which are never read: a
call's tokens go only to the choices still live in its slots when it is read. Either writes
K/V only past the tokens its sequence commits, into pages it holds for both calls' positions
(reserved before call N+1 is dispatched). Freeing those pages while call N+1 may still write
them is harmless: whatever writes a page next takes the cache call N+1 returns, so it runs
after it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

import samplers
from engine.buckets import bucket_for, buckets
from engine.decode_state import StepOutput
from engine.fills import Fills
from engine.grammar import DecodeMasks
from engine.handle import DONE
from engine.one_step import OneStepPrograms
from engine.requests import Timing
from engine.sequences import Choice, Fill, Request, advance
from engine.sharded_pages import ShardedPages
from engine.step import Programs
from engine.tokenizer import Tokenizer

# The most steps a call runs while a live choice streams (and the batch is too wide for one
# token a call): more steps amortise the host's work per call (8 against 4: 1.113 / 1.002 /
# 1.014x the tok/s at 1 / 8 / 32 sequences, scripts/bench_ab.py, README), but a stream gets
# its tokens in bursts that long.
STREAMED_STEPS = 4


@dataclasses.dataclass(eq=False)
class Call:
    """A dispatched decode call whose tokens the host has not read yet."""

    out: StepOutput  # on the device until read
    k: int
    rows: dict[int, tuple[Request, Choice]]  # slot → who decoded there
    fill: Fill | None  # the long prompt whose next chunk it carried or followed
    split: bool = False  # a forward and a sampling program (engine.split_step)


class Decoding(Fills):
    def __init__(
        self,
        programs: Programs,
        params: Any,
        cache: Any,
        pages: ShardedPages,
        tokenizer: Tokenizer,
        settings: Any,
        vocab_size: int,
    ):
        """`settings`: the scheduler's (decode_steps, min_kv_bucket, min_slot_bucket and
        Fills' are read here)."""
        super().__init__(programs, params, cache, pages, tokenizer, settings, vocab_size)
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        slots = settings.max_slots
        # Attended-position buckets of the decode programs. The CPU kernels attend to each
        # row's own positions through its pages, so one program serves every length there
        # (each compiled decode program holds ~30 MB of the server's memory).
        kv_low = settings.max_len if programs.model.packed else settings.min_kv_bucket
        self.kv_buckets = buckets(min(kv_low, settings.max_len), settings.max_len)
        self.slot_buckets = buckets(min(settings.min_slot_bucket, slots), slots)
        self.masks = DecodeMasks(samplers.mask.words(vocab_size))
        self.one_step = OneStepPrograms(programs)
        self.decode_width = 0  # slots the last decode computed
        self.inflight: Call | None = None
        self._masks_shardings: dict[tuple, Any] = {}  # a program's geometry → its masks'

    def _program_k(self, k: int) -> int:
        """The k of the decode program a call of k steps runs on (engine.step: one for every
        count up to the configured k, or on a GPU its own)."""
        return k if self.p.branchless else self.s.decode_steps

    def _steps(self) -> int:
        """k for this call: the configured k, or 1 while a constrained choice decodes
        (engine.one_step)."""
        k = self._call_steps(ahead=0)
        if k == 1:
            return k
        if all(c.constraint is None for _, c in self.live.values()):
            return 1 if self._per_token(ahead=0) else k
        live_pos = max(int(self.slot_pos[s]) for s in self.live)
        kv_len = bucket_for(min(live_pos + 1, self.s.max_len), self.kv_buckets)
        rows = [r for r in self.slot_buckets if r > max(self.live)]
        return self.one_step.steps(k, kv_len, rows, self.program_shapes)

    def _call_steps(self, ahead: int) -> int:
        """Steps of a call that is not one token a call: decode_steps, at most STREAMED_STEPS
        while a live choice streams (smaller bursts), and no more than the most tokens a live
        choice may still draw after the `ahead` steps in flight (the rest would be wasted).
        A program of decode_steps runs them (its step count is an argument); on a GPU, where
        each count is a program of its own (engine.step), always decode_steps."""
        k = self.s.decode_steps
        if self.p.branchless or not self.live:
            return k
        if self._streaming():
            k = min(k, STREAMED_STEPS)
        return max(1, min(k, self._tokens_left(ahead)))

    def _streaming(self) -> bool:
        return any(o.handle.request.stream for o, _ in self.live.values())

    def _tokens_left(self, ahead: int) -> int:
        """The most tokens a live choice may still draw after the `ahead` steps in flight."""
        owned = self.live.values()
        return max((o.handle.max_tokens - len(c.token_ids) - ahead for o, c in owned), default=0)

    def _per_token(self, ahead: int) -> bool:
        """Whether the next call takes one step: a live choice streams, no prompt chunk is
        being filled, and a compiled program fits the live slots within stream_rows. Each
        call costs the host a dispatch (~0.7 ms on the default model on 2 CPU cores, 14-19%
        of one stream's throughput: scripts/bench_streams.py), so only streams pay it, and
        only at small batch."""
        if not self._streaming() or self.filling:
            return False
        return self._one_step_rows(self._kv_len(ahead + 1), max(self.live) + 1) is not None

    def _one_step_rows(self, kv_len: int, highest: int) -> int | None:
        """The narrowest row bucket of at most stream_rows holding the live slots whose
        decode program is compiled (or compiles on demand), if any."""
        for rows in self.slot_buckets:
            if highest <= rows <= self.s.stream_rows and (
                self.p.decode_ready(self._program_k(1), kv_len, rows) or self.compile_on_demand
            ):
                return rows
        return None

    def program_shapes(self) -> tuple:
        """(params, cache, state) as the ShapeDtypeStructs a program compiles for."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (self.params, self.cache, self.state),
        )

    def _decode(self) -> Call | None:
        """Pages for the next call (preempting if the pool is short) and the call, every
        call before it read; None when preemption left nothing to decode."""
        k = self._steps()
        self._reserve_decode(k)
        if not self.live:
            return None
        return self._dispatch(k, ahead=0)

    def _run_ahead(self) -> bool:
        """Dispatch the next call, then read the one in flight; False, and nothing done,
        unless it is plain decoding (`_steady`) and the pool has the pages without
        preempting. With a constrained choice live, the next call's forward goes first and
        its sampling step after the read, with the masks the read made (engine.split_step)."""
        call = self.inflight
        if call is None or not self._steady(call, constrained=call.split):
            return False
        if call.split:
            kv_len = self._kv_len(call.k + 1)
            rows = self._split_rows(kv_len, max(self.live) + 1)
            if rows is None or not self._reserve_ahead(call.k + 1):
                return False
            self._send_tables()
            self.inflight = self._split_call(kv_len, rows, None, after=call)
            return True
        k = 1 if self._per_token(ahead=call.k) else self._call_steps(ahead=call.k)
        if not self._reserve_ahead(call.k + k):
            return False
        self.inflight = self._dispatch(k, ahead=call.k)
        self._collect(call)
        return True

    def _steady(self, call: Call, constrained: bool = False) -> bool:
        """Nothing waits to start decoding, no live choice needs the host between the calls
        (a cancellation, or a grammar mask unless `constrained`), and one may still decode
        after `call` (so the next call is not spent on rows that all reach max_tokens in it)."""
        if self.filling or self.ready or self.resumes:
            return False
        owned = self.live.values()
        if any(o.handle.cancelled for o, _ in owned):
            return False
        if not constrained and any(c.constraint is not None for _, c in owned):
            return False
        return self._tokens_left(ahead=call.k) > 0

    def _kv_len(self, steps: int) -> int:
        """The attended-positions bucket of a call reaching `steps` past the host's positions."""
        live_pos = max(int(self.slot_pos[s]) for s in self.live)
        return bucket_for(min(live_pos + steps, self.s.max_len), self.kv_buckets)

    def _split_rows(self, kv_len: int, highest: int) -> int | None:
        """The row bucket of a split one-token call (engine.split_step) over the live slots,
        if a constrained choice decodes and such programs are compiled for it."""
        if all(c.constraint is None for _, c in self.live.values()):
            return None
        return self.one_step.rows(kv_len, [r for r in self.slot_buckets if r >= highest])

    def _split_call(
        self, kv_len: int, rows: int, fill: Fill | None, after: Call | None = None
    ) -> Call | None:
        """A one-token call as its forward, then its sampling step with the live rows' masks;
        `after`: the call in flight, read between the two while the device runs the forward
        (the masks need its tokens). None if nothing is left to sample after that read."""
        forward, sample = self.one_step.split.pair(
            self.params, self.cache, self.state, kv_len=kv_len, rows=rows
        )
        self.cache, logits = forward(self.params, self.cache, self.state)
        self.decode_width = rows
        if after is not None:
            self._collect(after)
            if not self.live:
                return None
        constraints = {
            slot: c.constraint for slot, (_, c) in self.live.items() if c.constraint is not None
        }
        masks = self.masks.build(rows, constraints, self._masks_at((kv_len, rows), sample, 2))
        self.state, out = sample(self.state, logits, masks)
        return Call(out, 1, dict(self.live), fill, split=True)

    def _dispatch(self, k: int, ahead: int) -> Call:
        """Start a call of k steps over the live slots, without waiting for it; `ahead`:
        steps of a call in flight, by which the device's positions may lead the host's. It
        runs on the program of K steps, told to stop after k."""
        K = self._program_k(k)
        self._send_tables()
        kv_len, highest = self._kv_len(ahead + k), max(self.live) + 1
        fill, mixed = self._chunked(), None
        split = self._split_rows(kv_len, highest) if k == 1 else None
        if split is not None:  # a prompt chunk goes alone, before
            if fill is not None:
                self._compute(fill, min(self.s.max_num_batched_tokens, fill.target - fill.done))
            return self._split_call(kv_len, split, fill)
        if fill is not None:
            mixed = self._mixed_rows(K, kv_len, highest)
            if mixed is None:  # no mixed program for this geometry: the chunk goes alone
                self._compute(fill, min(self.s.max_num_batched_tokens, fill.target - fill.done))
        rows = mixed or next(
            r
            for r in self.slot_buckets
            if r >= highest and (self.p.decode_ready(K, kv_len, r) or r == self.s.max_slots)
        )
        width = self.s.max_num_batched_tokens - rows if mixed else 0
        decode = self.p.decoder(
            self.params, self.cache, self.state, k=K, kv_len=kv_len, rows=rows, chunk=width
        )
        self.decode_width = rows
        chunk = []
        if mixed:
            carried, n = self._carried(fill, width)
            chunk = [carried]
        constraints = {
            slot: c.constraint for slot, (_, c) in self.live.items() if c.constraint is not None
        }
        at = self._masks_at((K, kv_len, rows, width), decode, 3)
        masks = self.masks.build(rows, constraints, at)
        steps = np.int32(k)
        self.cache, self.state, out = decode(
            self.params, self.cache, self.state, masks, steps, *chunk
        )
        if mixed:
            self._computed(fill, n)
        return Call(out, k, dict(self.live), fill)

    def _masks_at(self, geometry: tuple, program: Any, index: int) -> Any:
        """Where the compiled program of this geometry takes its masks (positional argument
        `index`), read once: Compiled.input_shardings rebuilds the sharding of every
        argument, the params' hundreds of leaves included, each time (~13% of the loop's
        time at one token a call)."""
        if geometry not in self._masks_shardings:
            self._masks_shardings[geometry] = program.input_shardings[0][index]
        return self._masks_shardings[geometry]

    def _collect(self, call: Call) -> None:
        """Read a call's tokens into updates of the choices still live in its slots."""
        out: StepOutput = jax.device_get(call.out)
        now = time.perf_counter()
        for slot, (owner, choice) in call.rows.items():
            if self.live.get(slot, (None, None))[1] is not choice:
                continue  # it ended (or was preempted) after the call was dispatched
            steps = [j for j in range(call.k) if out.valid[j, slot]]
            if not steps:
                continue
            if owner.first_token_at is None:
                owner.first_token_at = now
            update = advance(owner.handle.request, choice, out, slot, steps, self.eos_ids)
            self.slot_pos[slot] += len(update.token_ids)
            owner.handle._push(update)
            if update.finish_reason is not None:
                self._release(owner, choice)
                if not owner.live():
                    self._finish(owner, now)
        if call.fill is not None:  # placed after the decode: its slot had no pages reserved
            self._if_filled(call.fill)

    def _finish(self, owner: Request, now: float) -> None:
        h = owner.handle
        first = owner.first_token_at or now
        h.timing = Timing(owner.prefill_at - h.submitted, first - h.submitted, now - first)
        h._push(DONE)
