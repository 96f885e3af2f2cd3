"""Data shards that own their slots and pages (engine.data_parallel, engine.sharded_pages):
the host-side slot order and free lists, the per-shard page pools under random use, and the
device-side row order of the decode programs, on the host's one device (the mesh runs are in
tests/test_engine_mesh.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from engine.data_parallel import FreeSlots, RowOrder
from engine.paging import OutOfPages
from engine.sharded_pages import ShardedPages

PS = 4


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_row_order_puts_each_slot_on_its_shard(shards):
    slots, order = 8, RowOrder(shards)
    rows = [order.row(s, slots) for s in range(slots)]
    assert sorted(rows) == list(range(slots))
    per = slots // shards
    assert all(rows[s] // per == s % shards for s in range(slots))  # row block = shard
    values = np.arange(slots) * 10
    assert order.rows(values).tolist() == [values[rows.index(r)] for r in range(slots)]


@pytest.mark.parametrize("shards, width", [(1, 2), (2, 2), (2, 6), (4, 4), (4, 8)])
def test_a_call_over_the_first_slots_reads_and_writes_exactly_those(shards, width):
    slots, order = 8, RowOrder(shards)
    by_slot = np.arange(slots * 3).reshape(slots, 3)
    state = {"x": jnp.asarray(order.rows(by_slot))}
    head = order.head(state, width)
    assert order.to_slots(head["x"]).tolist() == by_slot[:width].tolist()
    masks = jnp.asarray(by_slot[:width])
    assert order.to_slots(order.to_rows(masks)).tolist() == masks.tolist()
    outputs = jnp.stack([head["x"], head["x"] + 1])  # [k, rows, ...] as a decode returns
    assert order.to_slots(outputs, axis=1)[1].tolist() == (by_slot[:width] + 1).tolist()
    written = order.with_head(state, {"x": head["x"] + 1000})
    expect = by_slot.copy()
    expect[:width] += 1000  # the first `width` slots changed, no other
    assert np.asarray(written["x"]).tolist() == order.rows(expect).tolist()


def test_free_slots_hand_out_the_lowest_of_each_shard():
    free = FreeSlots(8, 2)
    assert len(free) == 8 and free.count(0) == free.count(1) == 4
    assert [free.take(1), free.take(1), free.take(0)] == [1, 3, 0]
    assert free.lowest(1) == 5 and len(free) == 5
    free.put(3)
    assert free.lowest(1) == 3 and free.count(1) == 3


def test_each_shard_hands_out_only_its_own_pages():
    pool = ShardedPages(16, PS, shards=2)
    assert pool.capacity == 14  # a pad page per shard
    for seq, shard in ((0, 0), (1, 1)):
        pool.admit(seq, [1] * 9, shard)
        pool.reserve(seq, 9)
    assert set(pool.page_table([0], 4)[0]) <= set(range(8))
    assert set(pool.page_table([1], 4)[0]) <= set(range(8, 16))
    assert pool.page_table([1], 4)[0].tolist()[3] == 8  # padded with its shard's pad page
    pool.admit(2, [], 1)
    pool.reserve(2, 4 * PS)  # shard 1: 7 pages, 3 + 4 used
    with pytest.raises(OutOfPages):
        pool.reserve(2, 1)  # shard 0 still has 4 free, but they are not shard 1's
    assert pool.available(0) == 4 and pool.available(1) == 0
    pool.check()


def test_the_prefix_cache_of_a_shard_serves_only_its_sequences():
    pool = ShardedPages(16, PS, shards=2)
    prompt = list(range(9))
    pool.admit(0, prompt, 0)
    pool.reserve(0, 9)
    pool.commit(0, prompt)
    assert pool.cached_tokens(prompt, 0) == 8 and pool.cached_tokens(prompt, 1) == 0
    assert pool.admit(1, prompt, 1) == 0 and pool.admit(2, prompt, 0) == 8
    pool.fork(2, 3)
    assert pool.shard_of(3) == 0
    pool.check()


def test_random_use_keeps_every_shard_to_its_pages():
    rng = np.random.default_rng(1)
    shards, pool = 4, ShardedPages(32, PS, shards=4)
    device = np.full((32, PS), -1)  # what each page holds, as the devices would
    seqs: dict[int, list[int]] = {}
    next_id, out_of_pages = 0, 0
    for _ in range(3000):
        op = rng.choice(["admit", "grow", "fork", "free"], p=[0.2, 0.6, 0.05, 0.15])
        sid = int(rng.choice(list(seqs))) if seqs else None
        if op == "admit" or sid is None:
            prompt = [int(t) for t in rng.integers(0, 2, rng.integers(1, 12))]
            shard = int(rng.integers(shards))
            cached = pool.admit(next_id, prompt, shard)
            seqs[next_id] = prompt[:cached]
            next_id += 1
        elif op == "grow":
            new = [int(t) for t in rng.integers(0, 2, rng.integers(1, 6))]
            try:
                copy = pool.reserve(sid, len(new))
            except OutOfPages:
                out_of_pages += 1
                pool.free(sid)
                del seqs[sid]
                continue
            if copy is not None:
                device[copy[1]] = device[copy[0]]
            table = pool.page_table([sid], 16)[0]
            for pos, tok in enumerate(new, start=len(seqs[sid])):
                device[table[pos // PS], pos % PS] = tok
            pool.commit(sid, new)
            seqs[sid] += new
        elif op == "fork":
            pool.fork(sid, next_id)
            seqs[next_id] = list(seqs[sid])
            next_id += 1
        else:
            pool.free(sid)
            del seqs[sid]
        pool.check()
        for s, tokens in seqs.items():
            table = pool.page_table([s], 16)[0]
            assert {int(p) // 8 for p in table} == {pool.shard_of(s)}
            assert device[table].ravel()[: len(tokens)].tolist() == tokens
    assert out_of_pages > 20
    for s in list(seqs):
        pool.free(s)
    pool.check()
    assert pool.used_pages == 0 and pool.free_pages + pool.evictable_pages == pool.capacity
