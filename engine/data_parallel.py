"""Data parallelism without cross-device cache traffic: each shard of the mesh's "data" axis
owns its decode slots and its KV pages, and a sequence's cache never leaves its shard.

Slot s lives on shard s % D (D data shards), so the lowest free slots, which the scheduler
hands out first, fall on every shard in turn. The decode state is laid out shard by shard
(its per-slot arrays are split over "data" in D contiguous blocks): slot s is row
(s % D) * (S / D) + s // D of an S-slot state (`RowOrder.row`). A decode call over the first
R slots takes the first R / D rows of every shard, which is local on each device, and hands
its outputs back in slot order; the host only ever speaks of slots.

Pages: shard d owns pages [d P / D, (d + 1) P / D) of a P-page pool, which the pool's
sharding puts on its devices (engine.sharding.cache_sharding), and a sequence takes all its
pages from its slot's shard (engine.sharded_pages). Attention then runs per shard
(`per_shard`, a shard_map over "data"): each device reads and writes only its own pages
through page ids made local, so no collective ever carries cache pages.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def data_shards() -> int:
    """The "data" axis size of the mesh the program is traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return 1
    return mesh.shape["data"]


class RowOrder:
    """Where each slot's row is in the decode state of a mesh with `shards` data shards."""

    def __init__(self, shards: int):
        self.shards = shards

    def row(self, slot: int, slots: int) -> int:
        """The state row of `slot` in an S = `slots` state."""
        return (slot % self.shards) * (slots // self.shards) + slot // self.shards

    def rows(self, by_slot: np.ndarray) -> np.ndarray:
        """A host array with one entry per slot (first axis), in state row order."""
        d, slots = self.shards, by_slot.shape[0]
        if d == 1:
            return by_slot
        blocks = by_slot.reshape(slots // d, d, *by_slot.shape[1:])
        return blocks.swapaxes(0, 1).reshape(by_slot.shape)

    # ---- inside the decode programs -------------------------------------------------
    def head(self, state: Any, slots: int) -> Any:
        """The rows of the first `slots` slots: the first slots / D of every shard's block."""
        d = self.shards
        if d == 1:
            return jax.tree.map(lambda x: x[:slots], state)
        return jax.tree.map(
            lambda x: x.reshape(d, -1, *x.shape[1:])[:, : slots // d].reshape(slots, *x.shape[1:]),
            state,
        )

    def with_head(self, state: Any, head: Any) -> Any:
        """The state with the rows `head` took replaced by `head`."""
        d = self.shards

        def put(full: jax.Array, part: jax.Array) -> jax.Array:
            if d == 1:
                return jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)
            blocks = full.reshape(d, -1, *full.shape[1:])
            part = part.reshape(d, -1, *part.shape[1:])
            return jax.lax.dynamic_update_slice_in_dim(blocks, part, 0, axis=1).reshape(full.shape)

        return jax.tree.map(put, state, head)

    def to_slots(self, x: jax.Array, axis: int = 0) -> jax.Array:
        """An array over head rows (along `axis`) put in slot order."""
        d = self.shards
        if d == 1:
            return x
        n = x.shape[axis]
        x = x.reshape(*x.shape[:axis], d, n // d, *x.shape[axis + 1 :])
        return jnp.swapaxes(x, axis, axis + 1).reshape(*x.shape[:axis], n, *x.shape[axis + 2 :])

    def to_rows(self, x: jax.Array) -> jax.Array:
        """An array over the first slots (first axis, slot order) put in head row order."""
        d, n = self.shards, x.shape[0]
        if d == 1:
            return x
        return jnp.swapaxes(x.reshape(n // d, d, *x.shape[1:]), 0, 1).reshape(x.shape)


class FreeSlots:
    """The free slots of each data shard (slot s on shard s % D), lowest first."""

    def __init__(self, slots: int, shards: int):
        self._heaps = [list(range(d, slots, shards)) for d in range(shards)]

    def __len__(self) -> int:
        return sum(map(len, self._heaps))

    def count(self, shard: int) -> int:
        return len(self._heaps[shard])

    def lowest(self, shard: int) -> int:
        return self._heaps[shard][0]

    def take(self, shard: int) -> int:
        return heapq.heappop(self._heaps[shard])

    def put(self, slot: int) -> None:
        heapq.heappush(self._heaps[slot % len(self._heaps)], slot)


def per_shard(attend: Callable, q, k, v, positions, page_table, cache_kv) -> tuple[jax.Array, Any]:
    """attend(q, k, v, positions, page_table, cache_kv) -> (out, cache_kv), run on every data
    shard over its own pages (a shard_map over "data"; the other axes stay automatic).

    A block of several rows (decode) is split over the shards, each row on its slot's shard.
    A block of one row (a prompt chunk) goes to every shard; the shard owning its pages
    computes it and the others' results are dropped (a sum over "data" of activations,
    never of pages). Page ids outside a shard's range are sent past its pool: writes through
    them are dropped, reads clipped, and such rows are never read back."""
    shards = data_shards()
    if shards == 1:
        return attend(q, k, v, positions, page_table, cache_kv)
    split = q.shape[0] > 1
    rows = P("data") if split else P()

    def local(me, q, k, v, positions, page_table, cache_kv):
        me, pages = me[0], jax.tree.leaves(cache_kv)[0].shape[0]
        ids = page_table - me * pages
        ids = jnp.where((ids >= 0) & (ids < pages), ids, pages)
        out, cache_kv = attend(q, k, v, positions, ids, cache_kv)
        if not split:
            owner = page_table[0, 0] // pages
            out = jax.lax.psum(jnp.where(me == owner, out, jnp.zeros_like(out)), "data")
        return out, cache_kv

    pools = jax.tree.map(lambda _: P("data"), cache_kv)
    # Each shard's index as data split over "data" (lax.axis_index lowers to a partition id,
    # which XLA's partitioner refuses where "model" stays automatic and the heads replicated).
    shard_ids = jnp.arange(shards, dtype=jnp.int32)
    return jax.shard_map(
        local,
        in_specs=(P("data"), rows, rows, rows, rows, rows, pools),
        out_specs=(rows, pools),
        axis_names={"data"},
    )(shard_ids, q, k, v, positions, page_table, cache_kv)
