"""The KV page pool of a mesh's data shards: one PageAllocator per shard over its own pages.

Shard d owns global pages [d * P / D, (d + 1) * P / D) of a P-page pool; its allocator
numbers them from 0 (its own pad page, never handed out) and this wrapper adds the shard's
offset to every page it returns. A sequence is admitted on a shard and takes every page from
it, a fork (n choices of a prompt) stays on its parent's, and each shard's prefix cache
serves only its own sequences: a sequence's K/V never leaves its shard
(engine.data_parallel). With one shard this is the plain allocator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.paging import PageAllocator, SeqId


class ShardedPages:
    def __init__(self, num_pages: int, page_size: int, shards: int = 1, namespace: str = ""):
        if num_pages % shards:
            raise ValueError(f"{num_pages} pages do not split over {shards} data shards")
        self.per_shard, self.page_size, self.num_pages = num_pages // shards, page_size, num_pages
        self.shards = [PageAllocator(self.per_shard, page_size, namespace) for _ in range(shards)]
        self._shard: dict[SeqId, int] = {}

    def _of(self, seq_id: SeqId) -> tuple[PageAllocator, int]:
        shard = self._shard[seq_id]
        return self.shards[shard], shard * self.per_shard

    def shard_of(self, seq_id: SeqId) -> int:
        return self._shard[seq_id]

    def available(self, shard: int) -> int:
        """Pages shard `shard` can still hand out (free and evictable)."""
        alloc = self.shards[shard]
        return alloc.free_pages + alloc.evictable_pages

    @property
    def capacity(self) -> int:
        """Pages that can hold tokens (every shard's pad page excluded)."""
        return self.num_pages - len(self.shards)

    @property
    def free_pages(self) -> int:
        return sum(a.free_pages for a in self.shards)

    @property
    def evictable_pages(self) -> int:
        return sum(a.evictable_pages for a in self.shards)

    @property
    def used_pages(self) -> int:
        return sum(a.used_pages for a in self.shards)

    @property
    def reserved_tokens(self) -> int:
        return sum(a.reserved_tokens for a in self.shards)

    @property
    def hit_tokens(self) -> int:
        return sum(a.hit_tokens for a in self.shards)

    def cached_tokens(self, prompt: Sequence[int], shard: int) -> int:
        return self.shards[shard].cached_tokens(prompt)

    def admit(self, seq_id: SeqId, prompt: Sequence[int] = (), shard: int = 0) -> int:
        """PageAllocator.admit on shard `shard`."""
        if seq_id in self._shard:
            raise ValueError(f"sequence {seq_id!r} already exists")
        cached = self.shards[shard].admit(seq_id, prompt)
        self._shard[seq_id] = shard
        return cached

    def reserve(self, seq_id: SeqId, n: int) -> tuple[int, int] | None:
        alloc, offset = self._of(seq_id)
        copy = alloc.reserve(seq_id, n)
        return None if copy is None else (copy[0] + offset, copy[1] + offset)

    def commit(self, seq_id: SeqId, token_ids: Sequence[int]) -> None:
        self._of(seq_id)[0].commit(seq_id, token_ids)

    def fork(self, parent: SeqId, child: SeqId) -> None:
        if child in self._shard:
            raise ValueError(f"sequence {child!r} already exists")
        self._of(parent)[0].fork(parent, child)
        self._shard[child] = self._shard[parent]

    def free(self, seq_id: SeqId) -> None:
        self._of(seq_id)[0].free(seq_id)
        del self._shard[seq_id]

    def page_table(self, seq_ids: Sequence[SeqId], max_pages_per_seq: int) -> np.ndarray:
        """PageAllocator.page_table in global page ids (padding: each shard's own pad page)."""
        rows = [self._row(s, max_pages_per_seq) for s in seq_ids]
        return np.stack(rows) if rows else np.zeros((0, max_pages_per_seq), np.int32)

    def _row(self, seq_id: SeqId, max_pages_per_seq: int) -> np.ndarray:
        alloc, offset = self._of(seq_id)
        return alloc.page_table([seq_id], max_pages_per_seq)[0] + np.int32(offset)

    def reserved(self, seq_id: SeqId) -> int:
        return self._of(seq_id)[0].reserved(seq_id)

    def committed(self, seq_id: SeqId) -> int:
        return self._of(seq_id)[0].committed(seq_id)

    def forget_cached(self) -> None:
        for alloc in self.shards:
            alloc.forget_cached()

    def check(self) -> None:
        """Every shard's invariants, and each sequence on exactly the shard it was admitted on."""
        for shard, alloc in enumerate(self.shards):
            alloc.check()
            mine = {s for s, d in self._shard.items() if d == shard}
            assert mine == set(alloc._seqs), f"shard {shard} holds other sequences"
