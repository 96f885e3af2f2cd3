"""A prompt's K/V into its pages, and its choices into decode slots.

A new sequence maps the prefix cache's full pages and reserves pages for the rest of its
prompt. What is left is computed at once when it fits one model call, else a chunk per loop
iteration: carried by the decode call of the sequences decoding (a mixed step, the chunk
taking the token budget their rows leave), or alone when nothing decodes or no mixed program
is compiled for the call. A filled prompt's n choices then fork its sequence into free
slots; a preempted choice resumes on its own.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

import samplers
from engine.decode_state import Chunk
from engine.grammar import Grammars
from engine.paging import OutOfPages
from engine.prefill import Prefiller
from engine.sequences import Choice, Fill, Request
from engine.sharded_pages import ShardedPages
from engine.slots import Slots
from engine.step import Programs
from engine.stop import StopMatcher
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


class Fills(Slots):
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
        """`settings`: the scheduler's (max_num_batched_tokens and Slots' are read here)."""
        super().__init__(programs, cache, pages, settings, vocab_size)
        self.params, self.tok, self.vocab_size = params, tokenizer, vocab_size
        self.grammars = Grammars(tokenizer, vocab_size)
        self.prefiller = Prefiller(
            programs,
            params,
            settings.min_prefill_bucket,
            settings.max_len,
            settings.max_num_batched_tokens,
        )
        self.filling: collections.deque[Fill] = collections.deque()  # K/V being computed
        self.ready: collections.deque[Fill] = collections.deque()  # choices wait for a slot
        self.waiting: list[Fill] = []  # in `filling`, computed at the end of admission
        self._seq_ids = itertools.count()
        # Compile a mixed decode program (decode + a prompt chunk) or a one-step one for
        # streams (engine.decoding) on first use; after a warm-up only those it compiled are
        # used: a chunk waits to go alone, a stream takes k steps a call.
        self.compile_on_demand = True

    def _new_fill(
        self, owner: Request, ids: np.ndarray, resume: Choice | None = None, reuse: bool = True
    ) -> Fill | None:
        """A new sequence for `ids`, mapping the prefix cache's pages (with `reuse`) and
        reserving pages for the rest; None, and nothing held, if the pool is short."""
        seq = next(self._seq_ids)
        prompt = ids if reuse else ()
        cached = self.pages.admit(seq, prompt, self._shard_for(prompt))
        try:
            self.pages.reserve(seq, len(ids) - 1 - cached)
        except OutOfPages:
            self.pages.free(seq)
            return None
        return Fill(owner, seq, ids, cached, resume)

    def _open_slots(self) -> int:
        """Free slots not promised to a sequence being filled or waiting to start."""
        return len(self.free) - len(self.filling) - len(self.ready)

    def _shard_for(self, prompt: np.ndarray | tuple) -> int:
        """The data shard a new sequence goes to: the most open slots (free, not promised to
        a fill), then the longest cached prefix of its prompt, then the most pages."""
        pages = self.pages
        if len(pages.shards) == 1:
            return 0
        promised = collections.Counter(pages.shard_of(f.seq) for f in (*self.filling, *self.ready))
        return max(
            range(len(pages.shards)),
            key=lambda d: (
                self.free.count(d) - promised[d],
                pages.cached_tokens(prompt, d),
                pages.available(d),
            ),
        )

    def _start_fill(self, fill: Fill) -> int:
        """Leave the fill's K/V to `_fill_waiting` if it fits one call (the tokens it will
        compute), else to `_fill_chunk`, a chunk per loop iteration."""
        self.filling.append(fill)  # so a failure frees its pages
        rest = fill.target - fill.done
        if rest > self.s.max_num_batched_tokens:
            return 0
        self.waiting.append(fill)
        return rest

    def _fill_waiting(self, failed: Callable[[Fill, Exception], None]) -> None:
        """Compute the fills admitted this iteration that fit one call, several to a call
        where that pays (Prefiller.groups), and start their choices. A failure is handed to
        `failed` for each fill whose K/V or slot it concerned; the others go on."""
        waiting, self.waiting = self.waiting, []
        sizes = [f.target - f.done for f in waiting]
        for group in self.prefiller.groups(sizes, self.compile_on_demand):
            fills = [waiting[i] for i in group if waiting[i] in self.filling]
            try:
                if len(fills) < len(group):  # a request failed meanwhile: the rest one by one
                    for fill in fills:
                        self._compute_all([fill])
                else:
                    self._compute_all(fills)
            except Exception as e:
                for fill in fills:
                    failed(fill, e)
                continue
            for fill in fills:
                try:
                    self.filling.remove(fill)
                    self._filled(fill)
                except Exception as e:
                    failed(fill, e)

    def _compute_all(self, fills: list[Fill]) -> None:
        """K/V of the fills' remaining positions (a chunk or less each), in one call."""
        if len(fills) == 1:
            if fills[0].target > fills[0].done:
                self._compute(fills[0], fills[0].target - fills[0].done)
            return
        spans = [(f.ids[f.done : f.target], f.done, self._table_row(f.seq)) for f in fills]
        self.cache = self.prefiller.compute_group(self.cache, spans)
        for fill in fills:
            self._computed(fill, fill.target - fill.done)

    def _chunked(self) -> Fill | None:
        """The oldest sequence being filled in chunks that has some left."""
        return next((f for f in self.filling if f.target - f.done > 0), None)

    def _fill_chunk(self) -> None:
        """The next chunk of the oldest sequence filled in chunks, alone."""
        fill = self._chunked()
        if fill is not None:
            self._compute(fill, min(self.s.max_num_batched_tokens, fill.target - fill.done))
            self._if_filled(fill)

    def _if_filled(self, fill: Fill) -> None:
        """After its last chunk, the sequence starts decoding."""
        if fill.done == fill.target:
            self.filling.remove(fill)
            self._filled(fill)

    def _compute(self, fill: Fill, n: int) -> None:
        """K/V of the fill's next n positions into its pages."""
        whole = fill.done == 0 and n == fill.target
        pages = self._table_row(fill.seq)
        self.cache = self.prefiller.compute(self.cache, fill.ids, fill.done, n, whole, pages)
        self._computed(fill, n)

    def _computed(self, fill: Fill, n: int) -> None:
        """The fill's next n positions hold K/V: its full pages can serve other prompts."""
        self.pages.commit(fill.seq, fill.ids[fill.done : fill.done + n].tolist())
        fill.done += n

    def _filled(self, fill: Fill) -> None:
        self.ready.append(fill)  # first: a failure while placing it frees its pages
        if self._place(fill):
            self.ready.remove(fill)

    def _place(self, fill: Fill) -> bool:
        """Start the fill's choices in free slots: a preempted choice on its own sequence; a
        new request's choices each on a fork of the prompt's (the last one takes it over),
        with its own sampling row. True once nothing of it waits for a slot."""
        owner = fill.owner
        r = owner.handle.request
        shard = self.pages.shard_of(fill.seq)
        if fill.resume is not None:
            if not self.free.count(shard):
                return False
            self._start_choice(owner, fill.resume, fill.seq, fill.resume.saved_row)
            return True
        while owner.pending and self.free.count(shard):
            index = owner.pending[0]
            seq = fill.seq
            if len(owner.pending) > 1:
                seq = next(self._seq_ids)
                self.pages.fork(fill.seq, seq)
            row = samplers.make_row(r.params, self.vocab_size, self.s.max_bias, fill.ids, index)
            choice = Choice(
                index,
                IncrementalDetokenizer(self.tok, context=r.prompt_ids),
                StopMatcher(r.stop),
                order=0,
                constraint=self.grammars.constraint(r.grammar, r.grammar_field)
                if r.grammar is not None
                else None,
            )
            try:
                self._start_choice(owner, choice, seq, row)
            except Exception:
                if seq != fill.seq:
                    self.pages.free(seq)
                raise
            owner.pending.pop(0)
            owner.choices.append(choice)
        return not owner.pending

    def _mixed_rows(self, k: int, kv_len: int, highest: int) -> int | None:
        """The decoded rows of a mixed program of k steps for this call (the narrowest
        compiled, or any width when compiling on demand), None if there is none or no room
        for a chunk (or no mixed programs here: Programs.mixes_chunks)."""
        if not self.p.mixes_chunks:
            return None
        for rows in self.slot_buckets:
            width = self.s.max_num_batched_tokens - rows
            if rows < highest or width < 1:
                continue
            if self.p.decode_ready(k, kv_len, rows, width) or self.compile_on_demand:
                return rows
        return None

    def _carried(self, fill: Fill, width: int) -> tuple[Chunk, int]:
        """The fill's next chunk padded to `width` tokens for a mixed decode call, and how
        many of them are real."""
        n = min(width, fill.target - fill.done)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = fill.ids[fill.done : fill.done + n]
        return Chunk(tokens, np.int32(fill.done), np.int32(n), self._table_row(fill.seq)), n
