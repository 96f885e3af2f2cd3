"""Continuous batching: one sequential loop that admits, prefills, decodes and streams.

The loop runs in one background thread and reads top to bottom: take cancellations,
prefill one chunk of a long prompt, admit queued requests into free slots (prefill +
insert, or straight into a slot from where its cache stops matching the prompt), run k
decode steps, turn the new tokens into text, stop strings and finish reasons, and hand
the updates to each request's handle. The device programs (engine.step) are the only
device work.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import threading
import time
from typing import Any

import jax
import numpy as np

import samplers
from engine.admission import Limits, check_request
from engine.handle import DONE, Handle
from engine.requests import (
    ChoiceUpdate,
    EngineOverloaded,
    GenerationRequest,
    Timing,
    TokenLogprob,
)
from engine.step import DecodeState, Programs, StepOutput
from engine.stop import StopMatcher
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("jaxfire.engine")


def buckets(lo: int, hi: int, midpoints: bool = False) -> list[int]:
    """Powers of two from lo up to hi (and 1.5 times each between, with `midpoints`), with
    hi itself last."""
    out, b = [], lo
    while b < hi:
        out += [b, b * 3 // 2] if midpoints and b * 3 // 2 < hi else [b]
        b *= 2
    return out + [hi]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


@dataclasses.dataclass
class _Choice:
    index: int
    slot: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False


@dataclasses.dataclass
class _Live:
    handle: Handle
    choices: list[_Choice]
    first_token_at: float | None = None
    prefill_at: float = 0.0
    pending: list[int] = dataclasses.field(default_factory=list)  # choices not yet started
    rows: Any = None  # the prompt's prefilled K/V while choices are pending
    slot: int | None = None  # a slot taken whose cache holds (or is being given) the prompt
    prefilled: int = 0  # prompt tokens (all but the last) whose K/V that slot holds


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    max_slots: int
    max_len: int
    decode_steps: int = 4  # k: decode steps per host sync
    max_queue: int = 256
    min_prefill_bucket: int = 16
    min_kv_bucket: int = 64
    min_slot_bucket: int = 1  # the mesh's data-axis size, so every bucket divides over it
    max_bias: int = 64  # logit_bias entries per request
    # Prompt tokens prefilled per loop iteration (at least one request): bounds how long
    # a burst of new requests stalls the sequences already decoding (Engine.from_pretrained
    # says why the default is large).
    prefill_budget: int = 4096
    # A one-choice prompt longer than this is prefilled into its slot this many tokens per
    # loop iteration, so the sequences already decoding get k tokens between two chunks.
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_len", "decode_steps", "max_queue", "prefill_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1: {getattr(self, name)}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1: {self.prefill_chunk}")


class Scheduler:
    def __init__(
        self,
        programs: Programs,
        params: Any,
        cache: Any,
        page_table: np.ndarray,
        tokenizer: Tokenizer,
        settings: SchedulerSettings,
        limits: Limits,
    ):
        self.p, self.params, self.cache = programs, params, cache
        self.page_table = page_table  # i32[slots, pages_per_seq]: row s, the pages of slot s
        self.tok, self.s, self.limits = tokenizer, settings, limits
        self.vocab_size = limits.vocab_size
        self.state = DecodeState.empty(page_table, self.vocab_size, settings.max_bias)
        # Prompts pad to the next bucket, and a prefill costs its padded length: with
        # midpoints a prompt pays less than half again its own length, not up to double.
        self.prefill_buckets = buckets(settings.min_prefill_bucket, settings.max_len, True)
        # The largest program a prompt of one choice needs; warm-up compiles up to it only.
        self.chunk_bucket = bucket_for(
            min(settings.prefill_chunk, settings.max_len), self.prefill_buckets
        )
        self.kv_buckets = buckets(min(settings.min_kv_bucket, settings.max_len), settings.max_len)
        self.slot_buckets = buckets(
            min(settings.min_slot_bucket, settings.max_slots), settings.max_slots
        )
        # A heap: new sequences take the lowest free slot, which keeps the live ones packed
        # low and the decoded slot bucket small.
        self.free = list(range(settings.max_slots))
        self.decode_width = 0  # slots the last decode computed
        self.slot_pos = np.zeros(settings.max_slots, np.int64)  # next input position, host copy
        # Per slot, the token ids whose K/V its positions 0 .. len - 1 hold once its sequence
        # has ended: a new prompt starting with some of them is prefilled from there on.
        self.cached: list[np.ndarray] = []
        self._forget_cached()
        self.reused_tokens = 0  # prompt tokens taken from a slot's cache rather than prefilled
        self.live: dict[int, tuple[_Live, _Choice]] = {}  # slot → owner
        self.queue: collections.deque[Handle] = collections.deque()
        self.waiting: collections.deque[_Live] = collections.deque()  # choices still pending
        self.prefilling: collections.deque[_Live] = collections.deque()  # long prompts, FIFO
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    # ---- caller side (any thread) -------------------------------------------------
    def submit(self, request: GenerationRequest) -> Handle:
        max_tokens = check_request(request, self.limits)
        handle = Handle(request, len(request.prompt_ids), max_tokens)
        with self.lock:
            if len(self.queue) >= self.s.max_queue:  # cancelled requests hold no place
                for h in [h for h in self.queue if h.cancelled]:
                    self.queue.remove(h)
                    h._push(DONE)
            if len(self.queue) >= self.s.max_queue:
                raise EngineOverloaded(f"the request queue is full ({self.s.max_queue})")
            self.queue.append(handle)
            self.lock.notify()
        return handle

    def stats(self) -> dict[str, int]:
        return {
            "queue_length": len(self.queue),
            "active_slots": self.s.max_slots - len(self.free),
            "max_slots": self.s.max_slots,
            "decode_width": self.decode_width,
            "reused_prompt_tokens": self.reused_tokens,
        }

    # ---- the loop (engine thread) -------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="jaxfire-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        while True:
            with self.lock:
                while self.running and not (
                    self.queue or self.live or self.waiting or self.prefilling
                ):
                    self.lock.wait()
                if not self.running:
                    return
            try:
                self.step()
            except Exception as e:  # fail every request in flight, keep serving
                n = len(self._owners())
                log.exception("engine step failed; ending the %d requests in flight", n)
                self._fail_all(e)

    def step(self) -> None:
        """One iteration: cancellations, a prompt chunk, admissions, k decode steps."""
        self._reap_cancelled()
        self._prefill_chunk()
        self._admit()
        if self.live:
            self._decode()

    def _reap_cancelled(self) -> None:
        for owner in self._owners():
            if not owner.handle.cancelled:
                continue
            owner.pending.clear()
            owner.rows = None
            if owner in self.waiting:
                self.waiting.remove(owner)
            self._drop_prefilling(owner)
            for choice in owner.choices:
                if not choice.finished:
                    self._release(owner, choice)
            self._finish(owner, time.perf_counter())

    def _admit(self) -> None:
        """FIFO: choices of already-prefilled requests take free slots first, then new
        requests are prefilled while a slot is free. A request with more choices than
        free slots starts what fits; the rest start from its kept prefill as slots free."""
        while self.waiting and self.free:
            self._place(self.waiting[0])
            if not self.waiting[0].pending:
                self.waiting.popleft()
        spent = 0
        while self.free and not self.waiting and spent < self.s.prefill_budget:
            with self.lock:
                while self.queue and self.queue[0].cancelled:
                    self.queue.popleft()._push(DONE)
                if not self.queue:
                    return
                handle = self.queue.popleft()
            owner = None
            try:
                owner = self._prefill(handle)
                if owner is not None and owner in self.prefilling:
                    continue  # placed once its last chunk is in; nothing prefilled yet
                spent += len(handle.request.prompt_ids)
                if owner is not None:
                    self._place(owner)
                    if owner.pending:
                        self.waiting.append(owner)
            except Exception as e:  # this request alone fails; the others carry on
                log.exception("prefill failed (%d prompt tokens)", len(handle.request.prompt_ids))
                self._fail(owner, handle, e)

    def _prefill(self, handle: Handle) -> _Live | None:
        """Run the prompt (all but its last token) once for every choice; None if the
        request needs no decoding (max_tokens = 0)."""
        r = handle.request
        owner = _Live(handle, [], prefill_at=time.perf_counter(), pending=list(range(r.n)))
        ids = np.asarray(r.prompt_ids, np.int32)
        P = len(ids)
        if self._into_slot(handle, owner, ids):
            return owner
        if P > 1:
            T = bucket_for(P - 1, self.prefill_buckets)
            tokens = np.zeros((1, T), np.int32)
            tokens[0, : P - 1] = ids[:-1]
            owner.rows, hidden = self.p.prefill(self.params, tokens, np.int32(P - 1))
            if r.prompt_logprobs:
                targets = np.zeros((1, T), np.int32)
                targets[0, : P - 1] = ids[1:]
                handle.prompt_logprobs = self._prompt_logprobs(
                    hidden, targets, ids, r.top_logprobs or 0
                )
        elif r.prompt_logprobs:
            handle.prompt_logprobs = (TokenLogprob(int(ids[0]), None, None),)
        if handle.max_tokens == 0:
            handle.timing = Timing(owner.prefill_at - handle.submitted, 0.0, 0.0)
            for i in range(r.n):
                handle._push(ChoiceUpdate(i, (), "", (), "length"))
            handle._push(DONE)
            return None
        return owner

    def _into_slot(self, handle: Handle, owner: _Live, ids: np.ndarray) -> bool:
        """Prefill a one-choice request straight into a slot: from where a free slot's cache
        stops matching its prompt (a shared system prompt, an earlier turn of the
        conversation), and a prompt longer than one chunk a chunk per loop iteration
        (`_prefill_chunk`). False: prefill it whole, then insert it (`_prefill`).

        Only slots that leave the decode width as it is are reuse candidates, and only
        prefixes of at least the smallest prompt bucket count; a short rest is prefilled only
        once its program is compiled (Engine.warmup)."""
        r = handle.request
        if r.n != 1 or r.prompt_logprobs or handle.max_tokens == 0 or len(ids) < 2:
            return False
        prompt = ids[:-1]  # the last token is the first decode step's input
        best, slot = self._longest_cached(prompt)
        if best < self.s.min_prefill_bucket:
            best, slot = 0, None
        rest = len(prompt) - best
        chunked = rest > self.s.prefill_chunk
        if not chunked and (
            slot is None
            or (rest and not self.p.extend_ready(bucket_for(rest, self.prefill_buckets)))
        ):
            return False
        slot = self.free[0] if slot is None else slot  # the lowest free slot, for a fresh prompt
        owner.slot, owner.prefilled = slot, best
        if chunked:
            # Decode steps write each row's K/V at its position, inactive rows included: aim
            # this one's at the prompt's end, which its first decode step overwrites.
            self.state = self.p.park_slot(self.state, np.int32(slot), np.int32(len(prompt)))
        elif rest:
            self._extend(owner, prompt, rest)
        self.free.remove(slot)  # only now: a failed program above leaves the slot free
        heapq.heapify(self.free)
        handle.cached_tokens = best
        self.reused_tokens += best
        if chunked:
            self.prefilling.append(owner)
        return True

    def _longest_cached(self, prompt: np.ndarray) -> tuple[int, int | None]:
        """(tokens, slot): the free slot within the decode width whose cache holds the
        longest prefix of `prompt`."""
        highest = max(self.live, default=-1) + 1
        width = bucket_for(max(highest, self.free[0] + 1), self.slot_buckets)
        best, slot = 0, None
        for s in sorted(self.free):
            if s >= width:
                break
            cached = self.cached[s]
            n = min(len(cached), len(prompt))
            differ = np.flatnonzero(cached[:n] != prompt[:n])
            match = int(differ[0]) if len(differ) else n
            if match > best:
                best, slot = match, s
        return best, slot

    def _extend(self, owner: _Live, prompt: np.ndarray, n: int) -> None:
        """Prefill the next `n` prompt tokens into the owner's slot, after what it holds."""
        start = owner.prefilled
        T = bucket_for(n, self.prefill_buckets)
        if not self.p.extend_ready(T) and n <= self.chunk_bucket:
            T = self.chunk_bucket  # compiled at warm-up: a padded chunk beats a compile now
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = prompt[start : start + n]
        extend = self.p.extender(self.params, self.cache, T)
        pages = self.page_table[owner.slot]
        self.cache = extend(self.params, self.cache, tokens, np.int32(start), np.int32(n), pages)
        owner.prefilled += n

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest prompt being prefilled in chunks; after its last
        one, its choice starts decoding."""
        if not self.prefilling:
            return
        owner = self.prefilling[0]
        prompt = np.asarray(owner.handle.request.prompt_ids[:-1], np.int32)
        self._extend(owner, prompt, min(self.s.prefill_chunk, len(prompt) - owner.prefilled))
        if owner.prefilled == len(prompt):
            self._place(owner)  # a failure leaves it in `prefilling`, for _fail_all
            self.prefilling.popleft()

    def _drop_prefilling(self, owner: _Live) -> None:
        """A request ended while its prompt was being prefilled: its slot is free again, its
        cache holding the part of the prompt prefilled so far."""
        if owner not in self.prefilling:
            return
        self.prefilling.remove(owner)
        if owner.slot is not None:
            prompt = owner.handle.request.prompt_ids
            self.cached[owner.slot] = np.asarray(prompt[: owner.prefilled], np.int32)
            heapq.heappush(self.free, owner.slot)
            owner.slot = None

    def _place(self, owner: _Live) -> None:
        """Start pending choices of `owner` in free slots: its prompt K/V goes into the
        slot, and the choice gets its own sampling row (seed stream, counts, mirostat)."""
        r = owner.handle.request
        ids = np.asarray(r.prompt_ids, np.int32)
        while owner.pending and (self.free or owner.slot is not None):
            # The slot _into_slot took (its prompt K/V in place), else the lowest free one.
            slot = owner.slot if owner.slot is not None else self.free[0]
            index = owner.pending[0]
            if owner.rows is not None:
                self.cache = self.p.insert(self.cache, owner.rows, self.page_table[slot])
            row = samplers.make_row(r.params, self.vocab_size, self.s.max_bias, ids, index)
            self.state = self.p.start_slot(
                self.state,
                np.int32(slot),
                self.page_table[slot],
                np.int32(ids[-1]),
                np.int32(len(ids) - 1),
                np.int32(owner.handle.max_tokens),
                np.bool_(not r.ignore_eos),
                np.bool_(r.top_logprobs is not None),
                row,
            )
            owner.pending.pop(0)
            if owner.slot is not None:
                owner.slot = None
            else:
                heapq.heappop(self.free)
            choice = _Choice(
                index,
                slot,
                IncrementalDetokenizer(self.tok, context=r.prompt_ids),
                StopMatcher(r.stop),
            )
            owner.choices.append(choice)
            self.live[slot] = (owner, choice)
            self.slot_pos[slot] = len(ids) - 1
        if not owner.pending:
            owner.rows = None  # every choice has its copy of the prompt K/V now

    def _prompt_logprobs(self, hidden, targets, ids: np.ndarray, n: int):
        """Entry i is token i of the prompt given tokens < i; the first has no context."""
        chosen, top_ids, top_lp = jax.device_get(
            self.p.prompt_logprobs(self.params, hidden, targets)
        )
        entries = [TokenLogprob(int(ids[0]), None, None)]
        for i in range(1, len(ids)):
            top = tuple(zip(top_ids[i - 1, :n].tolist(), top_lp[i - 1, :n].tolist(), strict=True))
            entries.append(TokenLogprob(int(ids[i]), float(chosen[i - 1]), None, top))
        return tuple(entries)

    def _decode(self) -> None:
        k = self.s.decode_steps
        live_pos = max(int(self.slot_pos[s]) for s in self.live)
        kv_len = bucket_for(min(live_pos + k, self.s.max_len), self.kv_buckets)
        highest = max(self.live) + 1
        rows = next(
            r
            for r in self.slot_buckets
            if r >= highest and (self.p.decode_ready(k, kv_len, r) or r == self.s.max_slots)
        )
        decode = self.p.decoder(self.params, self.cache, self.state, k=k, kv_len=kv_len, rows=rows)
        self.decode_width = rows
        self.cache, self.state, out = decode(self.params, self.cache, self.state)
        out: StepOutput = jax.device_get(out)
        now = time.perf_counter()
        for slot, (owner, choice) in list(self.live.items()):
            steps = [j for j in range(k) if out.valid[j, slot]]
            if not steps:
                continue
            if owner.first_token_at is None:
                owner.first_token_at = now
            update = self._advance(owner.handle.request, choice, out, slot, steps)
            owner.handle._push(update)
            if update.finish_reason is not None:
                self._release(owner, choice)
                if not self._owner_live(owner):
                    self._finish(owner, now)

    def _advance(
        self, r: GenerationRequest, choice: _Choice, out: StepOutput, slot: int, steps: list[int]
    ) -> ChoiceUpdate:
        """Fold this sync's tokens of one choice into text, stop checks and logprobs."""
        ids, entries, text, reason = [], [], "", None
        n_top = r.top_logprobs or 0
        for j in steps:
            tok = int(out.tokens[j, slot])
            ids.append(tok)
            choice.token_ids.append(tok)
            self.slot_pos[slot] += 1
            if r.top_logprobs is not None:
                top = zip(
                    out.top_ids[j, slot, :n_top].tolist(),
                    out.top_logprobs[j, slot, :n_top].tolist(),
                    strict=True,
                )
                entries.append(
                    TokenLogprob(
                        tok,
                        float(out.logprob[j, slot]),
                        float(out.sampling_logprob[j, slot]),
                        tuple(top),
                    )
                )
            text += choice.stop.feed(choice.detok.add(tok))
            if choice.stop.stop_at is not None:
                reason = "stop"
                break
            if out.finished[j, slot]:
                is_eos = tok in self.tok.eos_token_ids and not r.ignore_eos
                reason = "stop" if is_eos else "length"
                text += choice.stop.flush()
                break
        choice.finished = reason is not None
        logprobs = tuple(entries) if r.top_logprobs is not None else None
        return ChoiceUpdate(choice.index, tuple(ids), text, logprobs, reason)

    def _owner_live(self, owner: _Live) -> bool:
        return bool(owner.pending) or any(not c.finished for c in owner.choices)

    def _release(self, owner: _Live, choice: _Choice) -> None:
        choice.finished = True
        # Positions 0 .. slot_pos - 1 hold the K/V of the prompt and of every generated token
        # but the last (each is written when it is the step's input).
        sequence = owner.handle.request.prompt_ids + tuple(choice.token_ids)
        self.cached[choice.slot] = np.asarray(sequence[: self.slot_pos[choice.slot]], np.int32)
        del self.live[choice.slot]
        heapq.heappush(self.free, choice.slot)
        self.state = self.p.stop_slot(self.state, np.int32(choice.slot))

    def _finish(self, owner: _Live, now: float) -> None:
        h = owner.handle
        first = owner.first_token_at or now
        h.timing = Timing(owner.prefill_at - h.submitted, first - h.submitted, now - first)
        h._push(DONE)

    def _fail(self, owner: _Live | None, handle: Handle, error: Exception) -> None:
        """End one request with `error`: every slot it holds is free again."""
        if owner is not None:
            if owner in self.waiting:
                self.waiting.remove(owner)
            self._drop_prefilling(owner)
            owner.pending.clear()
            owner.rows = None
            if owner.slot is not None:  # taken, but no choice started in it
                heapq.heappush(self.free, owner.slot)
                owner.slot = None
            for choice in owner.choices:
                if self.live.get(choice.slot, (None, None))[1] is choice:
                    self._release(owner, choice)
        handle._push(error)
        handle._push(DONE)

    def _fail_all(self, error: Exception) -> None:
        """A device program failed: end every request in flight with the error."""
        for owner in self._owners():
            try:
                self._fail(owner, owner.handle, error)
            except Exception:  # noqa: BLE001 - the device is failing: end the others all the same
                log.exception("could not stop a failed request's slots cleanly")
        self._forget_cached()  # a failed program may have left the cache in any state

    def _owners(self) -> list[_Live]:
        """Every request in flight: decoding, being prefilled in chunks, or prefilled with
        choices still to place."""
        owners = {id(o): o for o, _ in self.live.values()}
        owners |= {id(o): o for o in (*self.waiting, *self.prefilling)}
        return list(owners.values())

    def _forget_cached(self) -> None:
        """No slot's cache is reused until a sequence ends in it again."""
        self.cached = [np.zeros(0, np.int32) for _ in range(self.s.max_slots)]
