"""Host-side page allocator for a paged KV cache.

K and V live on the device in a pool of `num_pages` pages of `page_size` tokens each. This
module decides which page holds which tokens; the device programs only see the result, a
fixed-shape int32 page table (one row per sequence) and the sequences' lengths.

Every page is in exactly one state: free, referenced by one or more sequences (a reference
count), or cached-evictable. A full page is keyed by a chained hash, key_i = H(key_{i-1},
tokens of page i), rooted in a namespace (the model's name) so two models never share a page.
A prompt that starts with cached pages maps them into its table instead of recomputing them.
A page nobody references stays cached until a page is needed and the free list is empty;
then the least recently released one is evicted.

A sequence grows in two steps: `reserve` gives it room for n more tokens before the device
step that writes them, `commit` records their ids once written (only then can a page that
became full be served to another prompt). `fork` shares a sequence's pages with a new one (n
choices of one prompt); a sharer that writes into a still shared, partly filled last page
gets a fresh page, and `reserve` returns the (src, dst) copy the device must make before
that step writes (the last sharer left writes in place).

Page 0 is never handed out: it pads page tables, so a padded entry is a valid page for a
gather and a write through it (bucket padding) lands in scratch, not in anyone's tokens.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import fractions
import hashlib
import re
from collections.abc import Hashable, Sequence

import numpy as np

PAD_PAGE = 0  # the scratch page that pads page tables; never allocated

SeqId = Hashable


class OutOfPages(RuntimeError):
    """The pool (free and evictable pages together) cannot supply the pages asked for."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold `tokens` tokens."""
    return -(-tokens // page_size)


def bytes_per_page(
    num_layers: int, kv_heads: int, head_dim: int, itemsize: int, page_size: int
) -> int:
    """Device bytes of one page: K and V of `page_size` tokens in every layer."""
    return 2 * num_layers * page_size * kv_heads * head_dim * itemsize


_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix, base in (("", 1024), ("ib", 1024), ("b", 1000))
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def parse_bytes(text: str) -> int:
    """A size in bytes from "1000000", "512MiB", "4GiB" or "2G" (K/M/G/T and KiB.. are
    powers of 1024, KB/MB/GB/TB powers of 1000; case is ignored), rounded down."""
    match = _SIZE.fullmatch(text.lower()) if isinstance(text, str) else None
    if match is None or match[2] not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size in bytes: expected a number and an optional "
            "unit, such as 1000000, 512MiB, 4GiB or 2G"
        )
    return int(fractions.Fraction(match[1]) * _UNITS[match[2]])


@dataclasses.dataclass
class _Seq:
    pages: list[int]  # page i holds tokens [i * page_size, (i + 1) * page_size)
    tokens: list[int]  # committed token ids: their K/V is on the device
    keys: list[bytes]  # chained hash of each full committed page
    reserved: int  # positions with a page behind them, >= len(tokens)


class PageAllocator:
    """Pages of one KV cache pool, the prefix cache over them and each sequence's table."""

    def __init__(self, num_pages: int, page_size: int, namespace: str = "") -> None:
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"need num_pages >= 2 and page_size >= 1: {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._root = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        self._free = list(range(num_pages - 1, PAD_PAGE, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._cache: dict[bytes, int] = {}  # key -> page
        self._key_of: dict[int, bytes] = {}  # page -> key
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._seqs: dict[SeqId, _Seq] = {}
        self.hit_tokens = 0  # prompt tokens mapped from the prefix cache by `admit`

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def evictable_pages(self) -> int:
        """Cached pages no sequence references: reusable, at the cost of the cached tokens."""
        return len(self._evictable)

    @property
    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free) - len(self._evictable)

    @property
    def reserved_tokens(self) -> int:
        """Positions all sequences hold pages for: the live tokens (and room reserved for the
        next step's), before rounding up to pages."""
        return sum(s.reserved for s in self._seqs.values())

    def can_allocate(self, n_pages: int) -> bool:
        return n_pages <= len(self._free) + len(self._evictable)

    def admit(self, seq_id: SeqId, prompt: Sequence[int] = ()) -> int:
        """Start a sequence, mapping the cached full pages its prompt starts with; return how
        many prompt tokens they hold. The last prompt token is never served from the cache:
        its logits are needed, so at most (len(prompt) - 1) // page_size pages are mapped."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        ps, keys = self.page_size, self._cached_keys(prompt)
        pages = [self._cache[key] for key in keys]
        for page in pages:
            self._ref(page)
        n = len(pages) * ps
        self._seqs[seq_id] = _Seq(pages, list(prompt[:n]), keys, n)
        self.hit_tokens += n
        return n

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Prompt tokens `admit` would map from the prefix cache now."""
        return len(self._cached_keys(prompt)) * self.page_size

    def _cached_keys(self, prompt: Sequence[int]) -> list[bytes]:
        """Keys of the cached full pages the prompt starts with (never its last token)."""
        ps, keys = self.page_size, []
        for i in range(max(len(prompt) - 1, 0) // ps):
            key = self._chain(keys[-1] if keys else self._root, prompt[i * ps : (i + 1) * ps])
            if key not in self._cache:
                break
            keys.append(key)
        return keys

    def reserve(self, seq_id: SeqId, n: int) -> tuple[int, int] | None:
        """Give a sequence room for n more tokens, all or nothing (OutOfPages). Return the
        (src, dst) page copy the device must make before writing, if the sequence's partly
        filled last page was shared (a fork) and now is its own copy; None otherwise."""
        s, ps = self._seqs[seq_id], self.page_size
        cow = n > 0 and s.reserved % ps != 0 and self._refs[s.pages[-1]] > 1
        need = pages_for(s.reserved + n, ps) - len(s.pages) + cow
        if not self.can_allocate(need):
            raise OutOfPages(
                f"sequence {seq_id!r} needs {need} pages; "
                f"{len(self._free)} free and {len(self._evictable)} evictable"
            )
        copy = None
        if cow:
            copy = (s.pages[-1], self._take())
            self._release(copy[0])  # the sequences it was shared with still hold it
            s.pages[-1] = copy[1]
        s.pages.extend(self._take() for _ in range(need - cow))
        s.reserved += n
        return copy

    def commit(self, seq_id: SeqId, token_ids: Sequence[int]) -> None:
        """Record the ids of tokens the device has written into reserved room; pages that
        became full join the prefix cache."""
        s, ps = self._seqs[seq_id], self.page_size
        if len(s.tokens) + len(token_ids) > s.reserved:
            raise ValueError(
                f"sequence {seq_id!r} has room for {s.reserved - len(s.tokens)} more tokens, "
                f"not {len(token_ids)}: reserve first"
            )
        s.tokens.extend(token_ids)
        for i in range(len(s.keys), len(s.tokens) // ps):
            key = self._chain(s.keys[-1] if s.keys else self._root, s.tokens[i * ps : (i + 1) * ps])
            s.keys.append(key)
            # Another sequence may have computed the same page first; its copy stays cached
            # and this one is freed when released.
            if key not in self._cache:
                self._cache[key], self._key_of[s.pages[i]] = s.pages[i], key

    def fork(self, parent: SeqId, child: SeqId) -> None:
        """Start `child` as a copy of `parent`, sharing its pages. The parent must have no
        room reserved and not yet committed: a step in flight would write into shared pages."""
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} already exists")
        p = self._seqs[parent]
        if p.reserved > len(p.tokens):
            raise ValueError(f"sequence {parent!r} has reserved tokens not committed yet")
        for page in p.pages:
            self._ref(page)
        self._seqs[child] = _Seq(list(p.pages), list(p.tokens), list(p.keys), p.reserved)

    def free(self, seq_id: SeqId) -> None:
        """End a sequence (finished, cancelled or preempted) and release its pages."""
        # Last page first: a prompt's tail becomes the least recently used and is evicted
        # before the pages that lead to it (without which it could not be found anyway).
        for page in reversed(self._seqs.pop(seq_id).pages):
            self._release(page)

    def page_table(self, seq_ids: Sequence[SeqId], max_pages_per_seq: int) -> np.ndarray:
        """Int32[len(seq_ids), max_pages_per_seq]: each sequence's pages, padded with
        PAD_PAGE."""
        table = np.full((len(seq_ids), max_pages_per_seq), PAD_PAGE, np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._seqs[seq_id].pages
            if len(pages) > max_pages_per_seq:
                raise ValueError(
                    f"sequence {seq_id!r} holds {len(pages)} pages, "
                    f"more than a table row's {max_pages_per_seq}"
                )
            table[row, : len(pages)] = pages
        return table

    def reserved(self, seq_id: SeqId) -> int:
        """Positions of a sequence with a page behind them (committed or reserved)."""
        return self._seqs[seq_id].reserved

    def committed(self, seq_id: SeqId) -> int:
        """Tokens of a sequence whose ids are recorded (`commit`)."""
        return len(self._seqs[seq_id].tokens)

    def pages(self, seq_id: SeqId) -> list[int]:
        """The sequence's pages, in position order."""
        return list(self._seqs[seq_id].pages)

    def forget_cached(self) -> None:
        """Drop the prefix cache: no later prompt maps a page computed so far (the device
        may have left the pages in any state). Evictable pages become free."""
        self._cache.clear()
        self._key_of.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def lengths(self, seq_ids: Sequence[SeqId]) -> np.ndarray:
        """Int32[len(seq_ids)]: each sequence's committed tokens."""
        return np.array([len(self._seqs[s].tokens) for s in seq_ids], np.int32)

    def check(self) -> None:
        """Assert every invariant of the pool (for tests: it walks every table)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        counts = collections.Counter()
        for seq_id, s in self._seqs.items():
            ps = self.page_size
            assert len(set(s.pages)) == len(s.pages), f"{seq_id!r} holds a page twice"
            assert len(s.pages) == pages_for(s.reserved, ps), f"{seq_id!r}: pages != reserved"
            assert len(s.tokens) <= s.reserved and len(s.keys) == len(s.tokens) // ps
            for i, page in enumerate(s.pages):
                # A cached page holds this sequence's tokens, and nobody else writes into
                # a page that one sequence has reserved room in.
                assert page not in self._key_of or s.keys[i : i + 1] == [self._key_of[page]]
                if len(s.tokens) < s.reserved and (i + 1) * ps > len(s.tokens):
                    assert self._refs[page] == 1, f"{seq_id!r} writes into shared page {page}"
            counts.update(s.pages)
        assert PAD_PAGE not in free | evictable | set(counts) | set(self._key_of)
        for page in range(1, self.num_pages):
            assert self._refs[page] == counts[page], f"page {page}: refcount != tables"
            states = (page in free, self._refs[page] > 0, page in evictable)
            assert sum(states) == 1, f"page {page} is in states {states}"
            assert page not in evictable or page in self._key_of
        assert {self._cache[k]: k for k in self._cache} == self._key_of, "cache maps differ"
        assert self.used_pages == len(counts)

    def _chain(self, prev: bytes, tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(prev + array.array("q", tokens).tobytes(), digest_size=16).digest()

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cache[self._key_of.pop(page)]
        self._refs[page] = 1
        return page

    def _ref(self, page: int) -> None:
        self._evictable.pop(page, None)
        self._refs[page] += 1

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._key_of:
                self._evictable[page] = None
            else:
                self._free.append(page)
