"""The collectives of a compiled program, read from its HLO text, and which of them carry KV
cache pages (tests of data parallelism: engine.data_parallel)."""

from __future__ import annotations

import re

_COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\]\S* (all-gather|collective-permute|all-to-all|all-reduce|reduce-scatter)"
    r"(?:-start)?\("
)


def collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(kind, element type, result shape) of every collective in the HLO text."""
    return [
        (m[3], m[1], tuple(int(d) for d in m[2].split(",") if d))
        for m in map(_COLLECTIVE.search, hlo.splitlines())
        if m
    ]


def carrying_pages(hlo: str, page_size: int, head_dim: int, kv_lens: set[int]) -> list:
    """Collectives whose result is laid out as cache positions: pages [..., page_size,
    head_dim] or a gathered sequence's [..., kv_len, head_dim]."""
    return [
        c
        for c in collectives(hlo)
        if len(c[2]) >= 2 and c[2][-1] == head_dim and c[2][-2] in {page_size, *kv_lens}
    ]
