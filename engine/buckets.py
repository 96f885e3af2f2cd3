"""Static sizes the device programs are compiled for: a request's size is padded up to one."""

from __future__ import annotations


def buckets(lo: int, hi: int, midpoints: bool = False, factor: int = 2) -> list[int]:
    """Powers of `factor` times lo up to hi (and 1.5 times each between, with `midpoints`),
    with hi itself last."""
    out, b = [], lo
    while b < hi:
        out += [b, b * 3 // 2] if midpoints and b * 3 // 2 < hi else [b]
        b *= factor
    return out + [hi]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest size that holds n."""
    return next(b for b in sizes if b >= n)
