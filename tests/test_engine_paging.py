"""The page allocator of the paged KV cache: its invariants under random use (with a
simulated device pool, so every sequence's table must read back exactly its tokens), the
prefix cache, LRU eviction, fork with copy-on-write, page tables and sizing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.kv_cache import pool_pages
from engine.paging import (
    PAD_PAGE,
    OutOfPages,
    PageAllocator,
    bytes_per_page,
    pages_for,
    parse_bytes,
)

PS = 4
OPS = ["admit", "reserve", "commit", "fork", "free"]


def filled(alloc: PageAllocator, seq_id, tokens: list[int]) -> list[int]:
    """Admit a sequence, write and commit all its tokens; return its pages."""
    cached = alloc.admit(seq_id, tokens)
    alloc.reserve(seq_id, len(tokens) - cached)
    alloc.commit(seq_id, tokens[cached:])
    return pages(alloc, seq_id)


def pages(alloc: PageAllocator, seq_id) -> list[int]:
    row = alloc.page_table([seq_id], alloc.num_pages)[0]
    return [int(p) for p in row if p != PAD_PAGE]


def test_random_operations_keep_every_invariant():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(64, PS, namespace="test-model")
    device = np.full((64, PS), -1)  # what each page holds, as the device would
    prefixes = [list(rng.integers(0, 3, 24)) for _ in range(3)]
    seqs: dict[int, dict] = {}  # id -> tokens (committed), pending (prompt), inflight
    admitted: list[int] = []  # admission order: the most recent is preempted first
    next_id, events = 0, dict(out_of_pages=0, copies=0, evictions=0)

    def write(sid: int, tokens: list[int]) -> None:
        s = seqs[sid]
        table = alloc.page_table([sid], 16)[0]
        for pos, tok in enumerate(tokens, start=len(s["tokens"])):
            device[table[pos // PS], pos % PS] = tok
        alloc.commit(sid, tokens)
        s["tokens"] += tokens

    def end(sid: int) -> None:
        alloc.free(sid)
        del seqs[sid]
        admitted.remove(sid)

    for _ in range(10_000):
        op = rng.choice(OPS, p=[0.1, 0.4, 0.35, 0.05, 0.1])
        sid = int(rng.choice(list(seqs))) if seqs else None
        if op == "admit" or sid is None:
            prefix = prefixes[rng.integers(3)][: rng.integers(0, 25)]
            prompt = [int(t) for t in prefix + list(rng.integers(0, 3, rng.integers(1, 8)))]
            cached = alloc.admit(next_id, prompt)
            assert cached % PS == 0 and cached <= (len(prompt) - 1) // PS * PS
            seqs[next_id] = dict(tokens=prompt[:cached], pending=prompt[cached:], inflight=[])
            admitted.append(next_id)
            next_id += 1
        elif op == "reserve" and not seqs[sid]["inflight"]:
            s = seqs[sid]
            if len(s["tokens"]) >= 48:
                end(sid)  # finished: max_tokens
                continue
            chunk = s["pending"][: rng.integers(1, 9)] or [int(rng.integers(0, 3))]
            before = (alloc.free_pages, alloc.evictable_pages, pages(alloc, sid))
            try:
                copy = alloc.reserve(sid, len(chunk))
            except OutOfPages:
                assert before == (alloc.free_pages, alloc.evictable_pages, pages(alloc, sid))
                events["out_of_pages"] += 1
                end(admitted[-1])  # preempt the most recently admitted
            else:
                events["evictions"] += alloc.evictable_pages < before[1]
                if copy is not None:
                    events["copies"] += 1
                    device[copy[1]] = device[copy[0]]
                s["inflight"], s["pending"] = chunk, s["pending"][len(chunk) :]
        elif op == "commit" and seqs[sid]["inflight"]:
            write(sid, seqs[sid]["inflight"])
            seqs[sid]["inflight"] = []
        elif op == "fork" and not seqs[sid]["inflight"]:
            s = seqs[sid]
            alloc.fork(sid, next_id)
            seqs[next_id] = dict(tokens=list(s["tokens"]), pending=s["pending"], inflight=[])
            admitted.append(next_id)
            next_id += 1
        elif op == "free":
            end(sid)  # finished or cancelled, with or without a step in flight
        alloc.check()
        ids = list(seqs)
        table, lengths = alloc.page_table(ids, 16), alloc.lengths(ids)
        for row, sid in enumerate(ids):
            assert lengths[row] == len(seqs[sid]["tokens"])
            assert device[table[row]].ravel()[: lengths[row]].tolist() == seqs[sid]["tokens"]

    assert events["out_of_pages"] > 50 and events["copies"] > 20 and events["evictions"] > 50
    assert alloc.hit_tokens > 1000
    for sid in list(seqs):
        end(sid)
    alloc.check()
    assert alloc.used_pages == 0 and alloc.free_pages + alloc.evictable_pages == 63
    assert not any(alloc._refs)


def test_shared_prefix_maps_the_cached_pages():
    alloc = PageAllocator(16, PS, namespace="m")
    prompt = list(range(1, 15))  # 3 full pages and 2 tokens
    first = filled(alloc, "a", prompt)
    alloc.free("a")
    assert alloc.admit("b", prompt[:12] + [99, 98, 97]) == 3 * PS
    assert pages(alloc, "b") == first[:3] and alloc.hit_tokens == 3 * PS
    assert alloc.admit("c", prompt[:4] + [0] * 10) == PS  # differs in the second page
    assert pages(alloc, "c") == first[:1]
    assert alloc.admit("d", [0] * 14) == 0
    alloc.check()


def test_the_last_prompt_token_is_always_computed():
    alloc = PageAllocator(16, PS)
    prompt = list(range(1, 13))  # exactly 3 full pages
    first = filled(alloc, "a", prompt)
    assert alloc.admit("same", prompt) == 2 * PS  # 3 pages cached, 2 served
    assert pages(alloc, "same") == first[:2]
    assert alloc.admit("longer", prompt + [7]) == 3 * PS
    assert alloc.admit("one", prompt[:1]) == 0
    alloc.check()


def test_pages_are_cached_once_written_and_once_per_content():
    alloc = PageAllocator(16, PS)
    prompt = list(range(1, 10))
    alloc.admit("a", prompt)
    alloc.reserve("a", len(prompt))
    alloc.admit("b", prompt)  # a's pages are reserved, not yet written
    alloc.reserve("b", len(prompt))
    assert alloc.lengths(["a", "b"]).tolist() == [0, 0]
    alloc.commit("a", prompt)
    alloc.commit("b", prompt)  # the same two full pages: a's stay the cached ones
    alloc.free("a")
    alloc.free("b")
    alloc.check()
    assert alloc.evictable_pages == 2 and alloc.free_pages == 15 - 2
    alloc.admit("c")
    with pytest.raises(ValueError, match="reserve first"):
        alloc.commit("c", [1])


def test_namespaces_do_not_share_pages():
    a, b = PageAllocator(8, PS, namespace="model-a"), PageAllocator(8, PS, namespace="model-b")
    assert a._chain(a._root, [1, 2, 3, 4]) != b._chain(b._root, [1, 2, 3, 4])


def test_eviction_is_least_recently_used_and_spares_referenced_pages():
    alloc = PageAllocator(6, PS)  # 5 pages to hand out
    pa, pb = [1] * 8, [2] * 4
    filled(alloc, "a", pa)
    filled(alloc, "b", pb)
    alloc.free("a")
    alloc.free("b")
    assert alloc.admit("t", pa + [0]) == 8  # a's pages used again: now b's is the oldest
    alloc.free("t")
    assert (alloc.free_pages, alloc.evictable_pages) == (2, 3)
    alloc.admit("c")
    alloc.reserve("c", 3 * PS)  # 2 free pages, then evicts b's
    assert alloc.admit("x", pb + [0]) == 0
    assert alloc.admit("y", pa + [0]) == 8  # a's 2 pages, referenced from here on
    with pytest.raises(OutOfPages):
        alloc.reserve("x", 1)
    assert alloc.admit("z", pa + [0]) == 8
    alloc.check()


def test_a_prompts_tail_is_evicted_before_its_head():
    alloc = PageAllocator(4, PS)  # 3 pages to hand out
    filled(alloc, "a", list(range(12)))
    alloc.free("a")
    alloc.admit("b")
    alloc.reserve("b", 1)  # evicts the third page, the one reachable only through the others
    assert alloc.admit("c", list(range(13))) == 2 * PS
    alloc.check()


def test_fork_shares_pages_and_copies_a_shared_partial_page_on_write():
    alloc = PageAllocator(8, PS)
    alloc.admit("p")
    alloc.reserve("p", 6)
    alloc.commit("p", [1, 2, 3, 4, 5, 6])  # one full page, one with 2 of 4 tokens
    full, partial = pages(alloc, "p")
    alloc.fork("p", "c1")
    alloc.fork("p", "c2")
    assert pages(alloc, "c1") == pages(alloc, "c2") == [full, partial]
    assert alloc.used_pages == 2
    src, dst = alloc.reserve("c1", 1)  # c1 writes into the shared page: its own copy
    assert src == partial and pages(alloc, "c1") == [full, dst]
    assert alloc.reserve("p", 1) == (partial, pages(alloc, "p")[1])  # still shared with c2
    assert alloc.reserve("c2", 1) is None  # c2 alone holds the original now
    assert pages(alloc, "c2") == [full, partial]
    alloc.check()
    for seq_id in ("p", "c1", "c2"):
        alloc.commit(seq_id, [7])
        alloc.free(seq_id)
    alloc.check()
    assert alloc.used_pages == 0


def test_fork_waits_for_the_step_in_flight():
    alloc = PageAllocator(8, PS)
    alloc.admit("p")
    alloc.reserve("p", 4)
    alloc.commit("p", [1, 2, 3, 4])
    alloc.reserve("p", 3)  # a step that writes into a second page is in flight
    with pytest.raises(ValueError, match="not committed yet"):
        alloc.fork("p", "c")
    alloc.commit("p", [5, 6, 7])
    alloc.fork("p", "c")
    assert pages(alloc, "c") == pages(alloc, "p")
    assert alloc.reserve("c", 0) is None
    alloc.check()


def test_page_table_is_fixed_shape_int32_padded_with_the_pad_page():
    alloc = PageAllocator(16, PS)
    for seq_id, n in (("a", 9), ("b", 1), ("c", 0)):
        alloc.admit(seq_id)
        alloc.reserve(seq_id, n)
    alloc.commit("a", list(range(5)))
    table = alloc.page_table(["a", "b", "c"], 5)
    assert table.shape == (3, 5) and table.dtype == np.int32
    assert table[0, 3:].tolist() == [PAD_PAGE] * 2 and PAD_PAGE not in table[0, :3]
    assert table[1, 1:].tolist() == [PAD_PAGE] * 4 and table[2].tolist() == [PAD_PAGE] * 5
    assert alloc.lengths(["a", "b", "c"]).tolist() == [5, 0, 0]
    assert alloc.page_table([], 5).shape == (0, 5)
    with pytest.raises(ValueError, match="more than a table row's 2"):
        alloc.page_table(["a"], 2)


def test_sizing():
    assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    size = bytes_per_page(num_layers=2, kv_heads=4, head_dim=64, itemsize=2, page_size=16)
    assert size == 2 * 2 * 16 * 4 * 64 * 2 == 32768
    config = SimpleNamespace(num_layers=2, num_kv_heads=4, head_dim=64)
    mib = parse_bytes("1MiB")
    # The budget bounds the pool, and so do max_seqs full sequences; data shards divide it.
    assert pool_pages(config, 2, 16, mib, max_seqs=100, max_len=64) == 32
    assert pool_pages(config, 2, 16, mib - 1, max_seqs=100, max_len=64) == 31
    assert pool_pages(config, 2, 16, mib - 1, max_seqs=100, max_len=64, multiple=4) == 28
    assert pool_pages(config, 2, 16, mib, max_seqs=2, max_len=64) == 2 * 4 + 1
    with pytest.raises(ValueError, match="less than one sequence of max_len 1024"):
        pool_pages(config, 2, 16, mib, max_seqs=1, max_len=1024)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1000000", 1_000_000),
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("2G", 2 * 2**30),
        ("2GB", 2 * 10**9),
        (" 1.5 kib ", 1536),
        ("100B", 100),
        ("1T", 2**40),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "4XB", "1e9", "1,000", "4 G i B", 4096])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="as a size in bytes"):
        parse_bytes(text)
