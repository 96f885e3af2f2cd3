"""The decode batch's slots and the KV pages behind them.

A slot holds one decoding sequence (a choice of a request): its row of the decode state
(engine.step.DecodeState) and its row of the page table, kept here as a host copy and sent
to the device before a decode call when a sequence gained or lost pages. An idle slot's row
is all PAD_PAGE, so the writes each decode step makes for every row, idle ones included,
land in the pad page, never in pages that have gone to another sequence (a call dispatched
before a slot was freed still writes through its old row: engine.decoding says why that is
harmless).

Before each decode call every sequence gets pages for its next k positions (two calls' when
the call is dispatched before the one in flight is read), the earliest started first; when
the pool is short the latest started is preempted: its sampling row is read back, its pages
freed (their full pages stay in the prefix cache) and it waits in `resumes` to be recomputed
and continue exactly where it stopped.
"""

from __future__ import annotations

import collections
import itertools
import logging
from typing import Any

import jax
import numpy as np

from engine.data_parallel import FreeSlots
from engine.paging import PAD_PAGE, OutOfPages, pages_for
from engine.sequences import Choice, Request
from engine.sharded_pages import ShardedPages
from engine.step import Programs

log = logging.getLogger("jaxfire.engine")


class Slots:
    def __init__(
        self, programs: Programs, cache: Any, pages: ShardedPages, settings: Any, vocab_size: int
    ):
        """`settings`: the scheduler's (max_slots, max_len, max_bias are read here)."""
        self.p, self.cache, self.pages, self.s = programs, cache, pages, settings
        slots = settings.max_slots
        self.tables = np.full((slots, programs.pages_per_seq), PAD_PAGE, np.int32)
        self.tables_changed = False
        self.state = programs.empty_state(self.tables, vocab_size, settings.max_bias)
        # New sequences take the lowest free slot of their shard, which keeps the live ones
        # packed low and the decoded slot bucket small.
        self.free = FreeSlots(slots, len(pages.shards))
        self.slot_pos = np.zeros(slots, np.int64)  # next input position, host copy
        self.live: dict[int, tuple[Request, Choice]] = {}  # slot → owner
        self.resumes: collections.deque[tuple[Request, Choice]] = collections.deque()
        self.preemptions = 0
        self._order = itertools.count()

    def _start_choice(self, owner: Request, choice: Choice, seq: int, row: Any) -> None:
        r, handle = owner.handle.request, owner.handle
        ids = choice.sequence(r.prompt_ids)
        shard = self.pages.shard_of(seq)
        slot = self.free.lowest(shard)
        self.state = self.p.start_slot(
            self.state,
            self._row(slot),
            np.int32(ids[-1]),
            np.int32(len(ids) - 1),
            np.int32(handle.max_tokens - len(choice.token_ids)),
            np.bool_(not r.ignore_eos),
            np.bool_(r.top_logprobs is not None),
            row,
        )
        self.free.take(shard)  # only now: a failed program above leaves the slot free
        choice.seq, choice.slot, choice.saved_row = seq, slot, None
        choice.order = next(self._order)
        self.live[slot] = (owner, choice)
        self.slot_pos[slot] = len(ids) - 1
        self._set_table(slot, seq)

    def _row(self, slot: int) -> np.int32:
        """The slot's row of the decode state (engine.data_parallel.RowOrder)."""
        return np.int32(self.p.order.row(slot, self.s.max_slots))

    def _table_row(self, seq: int) -> np.ndarray:
        return self.pages.page_table([seq], self.p.pages_per_seq)[0]

    def _set_table(self, slot: int, seq: int | None) -> None:
        self.tables[slot] = PAD_PAGE if seq is None else self._table_row(seq)
        self.tables_changed = True

    def _end_sequence(self, owner: Request, choice: Choice) -> None:
        """Free a decoding choice's slot and pages; its full pages stay in the prefix cache.
        Positions before the slot's position hold the K/V of the prompt and of every
        generated token but the last (each is written when it is a step's input)."""
        slot = choice.slot
        done = choice.sequence(owner.handle.request.prompt_ids)[: self.slot_pos[slot]]
        self.pages.commit(choice.seq, done[self.pages.committed(choice.seq) :])
        self.pages.free(choice.seq)
        del self.live[slot]
        self.free.put(slot)
        self._set_table(slot, None)
        choice.slot = None
        self.state = self.p.stop_slot(self.state, self._row(slot))

    def _release(self, owner: Request, choice: Choice) -> None:
        choice.finished = True
        self._end_sequence(owner, choice)

    def _preempt(self, slot: int) -> None:
        """Free a decoding sequence's pages for the others; it resumes (recomputed, mostly
        from the prefix cache) with its tokens and sampling state as they are."""
        owner, choice = self.live[slot]
        choice.saved_row = self.p.sampling_row(self.state, self._row(slot))
        self._end_sequence(owner, choice)
        self.resumes.appendleft((owner, choice))  # the earliest started resumes first
        self.preemptions += 1
        log.info("preempted a sequence of %d tokens: the KV cache is full", self.slot_pos[slot])

    def _reserve_decode(self, k: int) -> None:
        """Pages for each decoding sequence's next k positions, the earliest started first;
        when the pool is short the latest started is preempted (possibly the one asking)."""
        by_start = sorted(self.live.values(), key=lambda owned: owned[1].order)
        for _, choice in by_start:
            while choice.slot is not None:
                try:
                    self._grow(choice, k)
                    break
                except OutOfPages:
                    self._preempt(max(self.live, key=lambda s: self.live[s][1].order))

    def _reserve_ahead(self, steps: int) -> bool:
        """Pages for each decoding sequence's next `steps` positions (two decode calls'),
        preempting nobody: a call in flight still decodes them all. False if the pool is
        short (what was reserved stays: those sequences need it soon)."""
        try:
            for _, choice in self.live.values():
                self._grow(choice, steps)
        except OutOfPages:
            return False
        return True

    def _grow(self, choice: Choice, steps: int) -> None:
        """Pages for a decoding choice's next `steps` positions (OutOfPages if the pool is
        short), a shared last page copied first."""
        target = min(int(self.slot_pos[choice.slot]) + steps, self.s.max_len)
        held = self.pages.reserved(choice.seq)
        if target <= held:
            return
        copy = self.pages.reserve(choice.seq, target - held)
        if copy is not None:  # its last page was shared (a sibling choice)
            self.cache = self.p.copy_page(self.cache, *map(np.int32, copy))
        ps = self.pages.page_size
        if copy is not None or pages_for(target, ps) > pages_for(held, ps):
            self._set_table(choice.slot, choice.seq)

    def _send_tables(self) -> None:
        """The host's page table to the decode state, if a row changed since the last call."""
        if self.tables_changed:
            sharding = self.state.page_table.sharding
            rows = self.p.order.rows(self.tables).copy()
            self.state = self.state.replace(page_table=jax.device_put(rows, sharding))
            self.tables_changed = False
