"""The preallocated KV cache as a pool of pages, and its reads and writes through page tables.

Per layer one K and one V buffer, each [num_pages, kv_heads, page_size, head_dim]: head-major
within a page, so one head's positions in a page are contiguous (the CPU kernels stream them).
A sequence's page-table row (int32 [pages_per_seq]) names its pages in order: its position p
lives in page row[p // page_size] at offset p % page_size. A table [B, pages_per_seq] holds
one such row per batch row. With one page of page_size = max_len per slot and table[s] = [s]
(`one_page_per_slot`, what the model tests use) page s is exactly slot s of an unpaged
[slots, kv_heads, max_len, head_dim] cache. The engine sizes the pool from a memory budget
(`pool_pages`) and engine.paging decides which page holds which tokens.

Separate per-layer buffers (rather than one stacked [layers, ...] array) let XLA update each
layer in place; a stacked cache made it copy every layer's K and V each decode step.

An fp8 (e4m3) pool is a ScaledPages: the codes and that layer's K or V scale (engine.fp8).
Its writes store value / scale, saturated; its reads give codes * scale in the compute
dtype. Only XLA's ops read it (engine.api keeps the CPU kernels off an fp8 cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig
from engine.fp8 import E4M3, from_e4m3, to_e4m3
from engine.paging import bytes_per_page


@jax.tree_util.register_pytree_node_class
class ScaledPages:
    """An e4m3 page pool [num_pages, kv_heads, page_size, head_dim] and its scale. The scale
    is static (pytree aux data): a per-model constant, folded into the programs."""

    def __init__(self, codes: jax.Array, scale: float):
        self.codes, self.scale = codes, scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.codes.dtype

    def tree_flatten(self) -> tuple[tuple[jax.Array], float]:
        return (self.codes,), self.scale

    @classmethod
    def tree_unflatten(cls, scale: float, leaves: tuple[jax.Array]) -> ScaledPages:
        return cls(leaves[0], scale)


Pool = jax.Array | ScaledPages
# One (k, v) pair per layer, each [num_pages, kv_heads, page_size, head_dim]: a float array or
# ScaledPages.
KVCache = list[tuple[Pool, Pool]]

# The scale of every layer's K and V in an fp8 cache: 1.0, vLLM's default without
# calibration, because the default model's K/V fit e4m3 with it. Measured on SmolLM2-135M
# (float32; prose, code, a chat prompt, digits and punctuation, 34 to 615 tokens): max |K|
# (rotated) 23.1 and max |V| 14.9 over its 30 layers, 19x inside +-448, and median |K| about
# 0.9, far above 2^-6 where e4m3 turns subnormal. A model whose K or V passes 448 saturates
# there (never NaN); it would need its own per-layer scales (init_cache's `scales`).
KV_SCALE = 1.0


def init_cache(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: jnp.dtype,
    scales: Sequence[tuple[float, float]] | None = None,
) -> KVCache:
    """Zeroed pools, a (k, v) pair per layer; an e4m3 pair as ScaledPages with that layer's
    (k_scale, v_scale) from `scales` (default: KV_SCALE for all)."""
    shape, layers = (num_pages, config.num_kv_heads, page_size, config.head_dim), config.num_layers
    if jnp.dtype(dtype) != E4M3:
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers)]
    scales = scales or [(KV_SCALE, KV_SCALE)] * layers
    zeros = lambda scale: ScaledPages(jnp.zeros(shape, E4M3), scale)
    return [(zeros(k_scale), zeros(v_scale)) for k_scale, v_scale in scales]


# Tokens per page by backend: small pages on CPU and GPU (a chat template's system prompt
# fills one, so the prefix cache shares it; the CPU kernels prefetch across page ends), the
# TPU kernels' preferred tile there.
DEFAULT_PAGE_SIZE = {"cpu": 16, "tpu": 128, "gpu": 16}
DEFAULT_CPU_BUDGET = 2 * 1024**3  # bytes of KV cache on CPU unless --kv-cache-memory says
DEVICE_MEMORY_FRACTION = 0.9  # of an accelerator's memory left free once weights are loaded


class CacheConfigError(ValueError):
    """The KV cache cannot be set up as asked: a budget that cannot hold one sequence of the
    context length, a dtype it cannot be stored in."""


KV_CACHE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
KV_DTYPE_ALIASES = {"fp8": "float8_e4m3fn"}  # vLLM's spelling


def kv_dtype_named(name: str | jnp.dtype) -> jnp.dtype:
    """A KV cache dtype (one of KV_CACHE_DTYPES or an alias), or CacheConfigError naming
    the choices."""
    name = KV_DTYPE_ALIASES.get(name, name) if isinstance(name, str) else str(jnp.dtype(name))
    if name not in KV_CACHE_DTYPES:
        choices = ", ".join((*KV_CACHE_DTYPES, *KV_DTYPE_ALIASES))
        raise CacheConfigError(f"kv_cache_dtype {name!r} is not one of {choices}")
    return jnp.dtype(name)


def default_page_size(backend: str | None = None) -> int:
    return DEFAULT_PAGE_SIZE.get(backend or jax.default_backend(), 16)


def default_budget(device: jax.Device | None = None) -> int:
    """KV cache bytes when none are asked for: on an accelerator a fraction of the memory
    still free on it (vLLM's gpu_memory_utilization), on CPU a fixed 2 GiB."""
    device = device or jax.local_devices()[0]  # this process's: it can read its memory
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_BUDGET
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * DEVICE_MEMORY_FRACTION)


def pool_pages(
    config: ModelConfig,
    itemsize: int,
    page_size: int,
    budget: int,
    max_seqs: int,
    max_len: int,
    multiple: int = 1,
) -> int:
    """Pages of the pool, the pad page included: as many as `budget` bytes hold, but no
    more than `max_seqs` sequences of `max_len` tokens fill, and a multiple of `multiple`
    (the data-parallel shards). Raises CacheConfigError if one sequence of max_len cannot fit."""
    per_seq = -(-max_len // page_size)
    size = bytes_per_page(
        config.num_layers, config.num_kv_heads, config.head_dim, itemsize, page_size
    )
    enough = -(-(max_seqs * per_seq + 1) // multiple) * multiple
    pages = min(budget // size // multiple * multiple, enough)
    if pages - 1 < per_seq:
        raise CacheConfigError(
            f"a KV cache of {budget} bytes holds {max(pages - 1, 0) * page_size} tokens "
            f"({size} bytes a page of {page_size}), less than one sequence of max_len "
            f"{max_len}: raise --kv-cache-memory or lower --max-len"
        )
    return pages


def one_page_per_slot(slots: int) -> np.ndarray:
    """The page table i32[slots, 1] giving slot s the page s (of page_size = max_len)."""
    return np.arange(slots, dtype=np.int32)[:, None]


def _parts(buf: Pool) -> tuple[jax.Array, float | None]:
    """(the stored array, its scale; None for a float pool)."""
    return (buf.codes, buf.scale) if isinstance(buf, ScaledPages) else (buf, None)


def _pool(stored: jax.Array, scale: float | None) -> Pool:
    return stored if scale is None else ScaledPages(stored, scale)


def _stored(values: jax.Array, dtype: jnp.dtype, scale: float | None) -> jax.Array:
    return values.astype(dtype) if scale is None else to_e4m3(values, scale)


def write_pages(buf: Pool, new: jax.Array, positions: jax.Array, page_table: jax.Array) -> Pool:
    """Scatter new[b, t] (Float[B, T, kv_heads, head_dim]) to position positions[b, t] of the
    sequence whose pages are page_table[b] (i32[B, pages_per_seq]).

    Positions outside its pages (bucket padding past the last) are dropped by the scatter.
    """
    buf, scale = _parts(buf)
    num_pages, page_size = buf.shape[0], buf.shape[2]
    index = positions // page_size
    inside = (positions >= 0) & (index < page_table.shape[1])
    pages = jnp.take_along_axis(page_table, jnp.clip(index, 0, page_table.shape[1] - 1), axis=1)
    pages = jnp.where(inside, pages, num_pages)  # past the pool: dropped
    offsets = positions % page_size
    # One extra row aimed past the pool (dropped) keeps the write a scatter, updated in
    # place: XLA turned a one-row write into a dynamic-update-slice and fused a copy of it
    # into the attention's read of the cache, which then forced a copy of every layer's K
    # and V each step.
    pages = jnp.concatenate([pages, jnp.full_like(pages[:1], num_pages)])
    offsets = jnp.concatenate([offsets, offsets[:1]])
    new = _stored(jnp.concatenate([new, new[:1]]), buf.dtype, scale)
    return _pool(buf.at[pages, :, offsets].set(new, mode="drop"), scale)


def read_pages(buf: Pool, page_table: jax.Array, kv_len: int, dtype: jnp.dtype) -> jax.Array:
    """Positions 0 .. kv_len - 1 of each row's sequence, contiguous: [B, kv_heads, kv_len,
    head_dim], as stored (an fp8 pool: its values in `dtype`). Only the pages covering kv_len
    are gathered, and of a page longer than kv_len only its first kv_len positions (one page
    per slot: a slice of the slot, as before)."""
    buf, scale = _parts(buf)
    page_size = buf.shape[2]
    width = min(kv_len, page_size)
    used = -(-kv_len // page_size)
    pages = jnp.take(buf[:, :, :width], page_table[:, :used], axis=0, mode="clip")
    B, _, K, _, D = pages.shape  # [B, used, K, width, D]
    out = pages.transpose(0, 2, 1, 3, 4).reshape(B, K, used * width, D)[:, :, :kv_len]
    return out if scale is None else from_e4m3(out, scale, dtype)


def write_prefix(buf: Pool, rows: jax.Array, pages: jax.Array) -> Pool:
    """Write rows Float[1, kv_heads, T, head_dim] (a prefilled sequence's K or V) to positions
    0 .. T-1 of the sequence whose pages are `pages` (i32[pages_per_seq]), a page at a time:
    a prefix shorter than a page is one write of T positions (one page per slot: the slot's
    first T, as before), a last partial page is written whole, zeros past T."""
    buf, scale = _parts(buf)
    _, K, T, D = rows.shape
    chunk = min(T, buf.shape[2])
    used = -(-T // chunk)
    rows = jnp.pad(rows[0], ((0, 0), (0, used * chunk - T), (0, 0)))
    chunks = _stored(rows.reshape(K, used, chunk, D).transpose(1, 0, 2, 3), buf.dtype, scale)
    return _pool(buf.at[pages[:used], :, :chunk].set(chunks, mode="drop"), scale)


def copy_page(buf: Pool, src: jax.Array, dst: jax.Array) -> Pool:
    """Page dst becomes a copy of page src."""
    buf, scale = _parts(buf)
    return _pool(buf.at[dst].set(buf[src]), scale)


def insert_prefix(cache: KVCache, rows: KVCache, pages: jax.Array) -> KVCache:
    """Write a prefilled sequence's K/V rows into positions [0, T) of the sequence whose
    pages are `pages` (a page-table row, i32[pages_per_seq]), in every layer."""
    return [
        (write_prefix(k, rk, pages), write_prefix(v, rv, pages))
        for (k, v), (rk, rv) in zip(cache, rows, strict=True)
    ]


def copy_page_in_layers(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Page dst becomes a copy of page src in every layer (copy-on-write of a shared page)."""
    return [(copy_page(k, src, dst), copy_page(v, src, dst)) for k, v in cache]
