"""Continuous batching over a paged KV cache: one sequential loop that admits, prefills,
decodes and streams.

The loop runs in one background thread and reads top to bottom: take what callers did since
the last iteration (new requests, cancellations; in lockstep, process 0's, engine.lockstep),
read the decode call in flight, end cancelled requests, admit
(preempted sequences first, then queued requests) while a slot and the pages for the prompt
are free, give every decoding sequence pages for its next k tokens (preempting the latest
started when the pool is short), run k decode steps whose first also computes the next chunk
of a long prompt (engine.fills; the chunk alone when nothing decodes), turn the new tokens
into text, stop strings and finish reasons, and hand the updates to each request's handle.
While nothing but decoding goes on, the next decode call is dispatched before the host reads
the last one's tokens, so the device computes while the host works (engine.decoding).
The device programs (engine.step) are the only device work; which page holds which tokens
is engine.paging's.

A prompt's K/V is computed once into its own pages, minus the full pages the prefix cache
already holds; its n choices then share those pages (copy-on-write for the last, partial
one). A finished sequence's full pages stay cached for later prompts until the pool needs
them. A preempted sequence keeps its tokens and sampling state and is recomputed (mostly
from the prefix cache) before it decodes on, exactly where it stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any

import numpy as np

from engine.admission import Limits, check_request
from engine.decoding import Decoding
from engine.handle import DONE, Handle
from engine.lockstep import IDLE_TICK_S, Events, Lockstep, fatal
from engine.requests import (
    ChoiceUpdate,
    EngineOverloaded,
    GenerationRequest,
    Timing,
)
from engine.sequences import Fill, Request
from engine.sharded_pages import ShardedPages
from engine.step import Programs
from engine.tokenizer import Tokenizer

log = logging.getLogger("jaxfire.engine")


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    max_slots: int  # sequences decoded together (--max-seqs)
    max_len: int
    decode_steps: int = 8  # k: decode steps per host sync (engine.decoding)
    max_queue: int = 256
    min_prefill_bucket: int = 16
    min_kv_bucket: int = 64
    min_slot_bucket: int = 1  # the mesh's data-axis size, so every bucket divides over it
    max_bias: int = 64  # logit_bias entries per request
    # Prompt tokens prefilled per loop iteration (at least one request): bounds how long
    # a burst of new requests stalls the sequences already decoding (Engine.from_pretrained
    # says why the default is large).
    prefill_budget: int = 4096
    # Tokens one model call computes. A prompt longer than this is prefilled in chunks, one
    # per loop iteration: while sequences decode, the chunk (this many tokens less the
    # decoded rows) rides in the first step of their decode call (a mixed step).
    max_num_batched_tokens: int = 512
    # While a streamed choice decodes and the live slots fit this many rows, a decode call
    # takes one step, so each token reaches its stream as it is made (0: always k steps).
    stream_rows: int = 8

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_len", "decode_steps", "max_queue", "prefill_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1: {getattr(self, name)}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1: {self.max_num_batched_tokens}"
            )


class Scheduler(Decoding):
    def __init__(
        self,
        programs: Programs,
        params: Any,
        cache: Any,
        pages: ShardedPages,
        tokenizer: Tokenizer,
        settings: SchedulerSettings,
        limits: Limits,
        lockstep: Lockstep | None = None,
    ):
        """`lockstep`: this process is one of several serving the model together."""
        super().__init__(programs, params, cache, pages, tokenizer, settings, limits.vocab_size)
        self.limits = limits
        self.lockstep = lockstep
        self.one_step.background = lockstep is None  # in lockstep: compiled in the loop
        self.reused_tokens = 0  # prompt tokens mapped from the prefix cache
        self.inbox: list[Handle] = []  # submitted; the loop takes them at its next iteration
        self.queue: collections.deque[Handle] = collections.deque()  # taken, waiting to start
        self._ids = itertools.count()
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ---- caller side (any thread) -------------------------------------------------
    def submit(self, request: GenerationRequest) -> Handle:
        if self.lockstep is not None and not self.lockstep.leader:
            raise RuntimeError("in a distributed engine only process 0 takes requests")
        max_tokens = check_request(request, self.limits)
        if request.grammar is not None:  # compiled now: a bad one fails here, not mid-reply
            self.grammars.compile(request.grammar, request.grammar_field)
        handle = Handle(request, len(request.prompt_ids), max_tokens)
        with self.lock:
            waiting = sum(not h.cancel_asked for h in (*self.inbox, *self.queue))
            if waiting >= self.s.max_queue:  # cancelled requests hold no place
                raise EngineOverloaded(f"the request queue is full ({self.s.max_queue})")
            self.inbox.append(handle)
            self.lock.notify()
        return handle

    def stats(self) -> dict[str, int]:
        pool = self.pages
        return {
            "queue_length": len(self.queue) + len(self.inbox),
            "active_slots": self.s.max_slots - len(self.free),
            "max_slots": self.s.max_slots,
            "decode_width": self.decode_width,
            "reused_prompt_tokens": self.reused_tokens,
            "preemptions": self.preemptions,
            "kv_page_size": pool.page_size,
            "kv_pages": pool.capacity,
            "kv_pages_used": pool.used_pages,
            "kv_pages_cached": pool.evictable_pages,
            "kv_tokens": pool.reserved_tokens,
        }

    def forget_cached(self) -> None:
        """No later prompt reuses K/V computed so far (its pages are recomputed)."""
        self.pages.forget_cached()

    # ---- the loop (engine thread) -------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="jaxfire-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop (in lockstep, process 0's stops every process's; the others' waits
        for it)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        self.one_step.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the loop has ended (in lockstep: process 0 stopped it); False if it still
        runs after `timeout` seconds."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.thread is None or not self.thread.is_alive()

    def _busy(self) -> bool:
        work = self.queue or self.live or self.filling or self.ready or self.resumes
        return bool(work) or self.inflight is not None

    def _run(self) -> None:
        while True:
            try:
                if not self.step():
                    return
            except Exception as e:  # fail every request in flight, keep serving
                if self.lockstep is not None:
                    fatal(e)
                n = len(self._owners())
                log.exception("engine step failed; ending the %d requests in flight", n)
                self._fail_all(e)

    def _sync(self) -> bool:
        """Take what callers did since the last iteration (waiting for it while the loop is
        idle): queue new requests, end cancelled ones. In lockstep process 0 broadcasts it
        and every process applies the same. False once the engine stops."""
        events = None
        if self.lockstep is None or self.lockstep.leader:
            with self.lock:
                idle = lambda: not (self.stopping or self._busy() or self.inbox)  # noqa: E731
                if self.lockstep is not None and idle():
                    self.lock.wait(IDLE_TICK_S)  # then broadcast all the same
                while self.lockstep is None and idle():
                    self.lock.wait()
                new, self.inbox = self.inbox, []
                stop = self.stopping
            for h in (h for h in new if h.cancel_asked):
                h._push(DONE)  # never admitted: no other process knows of it
            gone = [h.id for h in self._handles() if h.cancel_asked and not h.cancelled]
            events = Events([h for h in new if not h.cancel_asked], gone, stop)
        if self.lockstep is not None:
            events = self.lockstep.exchange(events)
        by_id = {h.id: h for h in self._handles()}
        for i in events.cancelled:
            by_id[i].cancelled = True
        for h in events.admitted:
            h.id = next(self._ids)
        with self.lock:
            self.queue.extend(events.admitted)
            for h in [h for h in self.queue if h.cancelled]:
                self.queue.remove(h)
                h._push(DONE)
        return not events.stop

    def _handles(self) -> list[Handle]:
        return [*self.queue, *(owner.handle for owner in self._owners())]

    def step(self) -> bool:
        """One iteration: take what callers did since the last (`_sync`), then, if there is
        work: while only decoding goes on, dispatch the next decode call, then read the one
        in flight (engine.decoding); otherwise read the call in flight, end cancelled
        requests, admit, and dispatch k decode steps carrying the next chunk of a long
        prompt (or run that chunk alone when nothing decodes). False once the engine stops."""
        if not self._sync():
            return False
        if not self._busy():
            return True
        if not (self.queue and self._open_slots() > 0) and self._run_ahead():
            return True
        if self.inflight is not None:
            call, self.inflight = self.inflight, None
            self._collect(call)
        self._reap_cancelled()
        if not self.live:
            self._fill_chunk()
        self._admit()
        if self.live:
            self.inflight = self._decode()
        return True

    def _reap_cancelled(self) -> None:
        for owner in self._owners():
            if owner.handle.cancelled:
                self._drop(owner)
                self._finish(owner, time.perf_counter())

    # ---- admission ------------------------------------------------------------------
    def _admit(self) -> None:
        """Choices of filled prompts take free slots first, then preempted sequences resume,
        then queued requests start (FIFO, up to the prefill budget), each while a slot and
        the pages its prompt needs are free; otherwise it waits at the head of its queue.
        The prompts that fit one call are then computed, several to a call where it pays."""
        self._take_admissions()
        self._fill_waiting(self._fill_failed)

    def _fill_failed(self, fill: Fill, error: Exception) -> None:
        """Computing a fill, or starting its choices, failed: its request alone ends."""
        if self.lockstep is not None:
            raise error  # the loop's failure: every process ends
        if fill in self.filling or fill in self.ready:  # not ended with another of its fills
            log.error("prefill failed (%d prompt tokens)", len(fill.ids), exc_info=error)
            self._fail(fill.owner, error)

    def _take_admissions(self) -> None:
        while self.ready and self._place(self.ready[0]):
            self.ready.popleft()
        while self.resumes and self._open_slots() > 0:
            owner, choice = self.resumes[0]
            ids = np.asarray(choice.sequence(owner.handle.request.prompt_ids), np.int32)
            fill = self._new_fill(owner, ids, resume=choice)
            if fill is None:
                return  # new requests wait behind it: it started first
            self.resumes.popleft()
            self._start_fill(fill)
        spent = 0
        while self._open_slots() > 0 and spent < self.s.prefill_budget:
            with self.lock:
                if not self.queue:
                    return
                handle = self.queue.popleft()
            owner = Request(handle, pending=list(range(handle.request.n)))
            owner.prefill_at = time.perf_counter()
            try:
                cost = self._start_request(owner)
            except Exception as e:  # this request alone fails; the others carry on
                if self.lockstep is not None:
                    raise  # the loop's failure: every process ends
                log.exception("prefill failed (%d prompt tokens)", len(handle.request.prompt_ids))
                self._fail(owner, e)
                continue
            if cost is None:  # not enough free pages yet: first in line once there are
                with self.lock:
                    self.queue.appendleft(handle)
                return
            spent += cost

    def _start_request(self, owner: Request) -> int | None:
        """Start computing a request's prompt K/V; the prompt tokens computed now, or None
        when the pool cannot hold the prompt yet. A request that needs the prompt's hidden
        states (prompt logprobs) is prefilled whole, without the prefix cache."""
        handle = owner.handle
        r = handle.request
        ids = np.asarray(r.prompt_ids, np.int32)
        if handle.max_tokens == 0 and not r.prompt_logprobs:
            self._finish_unsampled(owner)
            return 0
        if not r.prompt_logprobs:
            fill = self._new_fill(owner, ids)
            if fill is None:
                return None
            handle.cached_tokens = fill.done
            self.reused_tokens += fill.done
            return self._start_fill(fill)
        fill = self._new_fill(owner, ids, reuse=False) if handle.max_tokens else None
        if handle.max_tokens and fill is None:
            return None
        if fill is not None:
            self.filling.append(fill)  # so a failure below frees its pages
        rows = self.prefiller.scored(handle, ids)
        if fill is None:
            self._finish_unsampled(owner)
            return len(ids)
        if rows is not None:
            self.cache = self.p.insert(self.cache, rows, self._table_row(fill.seq))
        self._computed(fill, fill.target)
        self.filling.remove(fill)
        self._filled(fill)
        return len(ids)

    def _finish_unsampled(self, owner: Request) -> None:
        """max_tokens = 0: every choice ends at once, with no token."""
        h = owner.handle
        h.timing = Timing(owner.prefill_at - h.submitted, 0.0, 0.0)
        for i in range(h.request.n):
            h._push(ChoiceUpdate(i, (), "", (), "length"))
        h._push(DONE)
        owner.pending.clear()

    # ---- ending requests --------------------------------------------------------------
    def _drop(self, owner: Request) -> None:
        """Free everything a request holds: fills' pages, slots, its place to resume."""
        owner.pending.clear()
        for queue in (self.filling, self.ready):
            for fill in [f for f in queue if f.owner is owner]:
                queue.remove(fill)
                self.pages.free(fill.seq)
        self.resumes = collections.deque((o, c) for o, c in self.resumes if o is not owner)
        for choice in owner.choices:
            if choice.slot is not None and self.live.get(choice.slot, (None, None))[1] is choice:
                self._release(owner, choice)
            choice.finished = True

    def _fail(self, owner: Request, error: Exception) -> None:
        """End one request with `error`: every slot and page it holds is free again."""
        self._drop(owner)
        owner.handle._push(error)
        owner.handle._push(DONE)

    def _fail_all(self, error: Exception) -> None:
        """A device program failed: end every request in flight with the error."""
        self.inflight = None  # its tokens are lost with the requests that drew them
        for owner in self._owners():
            try:
                self._fail(owner, error)
            except Exception:  # noqa: BLE001 - the device is failing: end the others all the same
                log.exception("could not free a failed request's slots cleanly")
        self.forget_cached()  # a failed program may have left the cache in any state

    def _owners(self) -> list[Request]:
        """Every request in flight: decoding, being filled, waiting for a slot or to resume."""
        owners = {id(o): o for o, _ in (*self.live.values(), *self.resumes)}
        owners |= {id(f.owner): f.owner for f in (*self.filling, *self.ready)}
        return list(owners.values())
