"""Attention of one block of a step (engine.model.Rows) over the paged KV cache, after the
q/k/v projection: the seam where each backend's attention plugs in.

Packed weights (the CPU path) go to engine.cpu_kernels: a fresh prefill attends within its
new tokens and returns their K/V, one token per row is decode, a row of several tokens (or
several such rows with their own lengths) extends what its pages hold; each writes the
cache in place. Everything else writes the block's K/V into its pages, then attends on each
data shard of a mesh over its own pages (engine.data_parallel.per_shard): on a GPU or TPU
through jax's paged decode kernel, which reads the pool as stored
(engine.attention.pool_kernels); elsewhere, or where the kernel does not apply (sliding
windows, fp8), XLA's ops gather the pages and take a masked float32 softmax, grouped by KV
head (no K/V repetition). A fresh prefill on a GPU runs jax.nn.dot_product_attention
(cuDNN's flash attention). An fp8 cache is encoded on the write and decoded to the compute
dtype on the gather (engine.kv_cache).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from engine import cpu_kernels
from engine.config import ModelConfig
from engine.data_parallel import per_shard
from engine.kv_cache import read_pages, write_pages

if TYPE_CHECKING:
    from engine.model import Rows

F32 = jnp.float32
KV = tuple[jax.Array, jax.Array]


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, HF's rotate-half layout. x: [B, T, heads, D]; cos, sin: [B, T, D/2]
    (rope_tables of the tokens' positions)."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(positions: jax.Array, kv_len: int, window: int | None) -> jax.Array:
    """Bool[B, T, S]: key j is visible to the query at position p iff j <= p (and within
    the sliding window). Cache entries past a row's length are never visible."""
    keys = jnp.arange(kv_len)[None, None, :]
    q = positions[:, :, None]
    mask = keys <= q
    if window is not None:
        mask &= keys > q - window
    return mask


def attend_packed(
    cfg: ModelConfig, qkv: jax.Array, block: Rows, rotation: KV, cache_kv: KV, window: int | None
) -> tuple[jax.Array, KV] | None:
    """The block's attention through engine.cpu_kernels from its fused projection qkv
    [B, T, (H + 2K) D], in a layer of sliding `window` (None: global): (out [B, T, H D],
    cache), or None where no kernel applies (several rows of several tokens without
    per-row lengths: XLA's ops)."""
    cos, sin = rotation
    B, T = block.tokens.shape
    if cfg.query_pre_attn_scalar not in (None, cfg.head_dim):
        # The kernels scale by head_dim**-0.5: q rescaled before its rotation (linear).
        q_out, ratio = cfg.num_heads * cfg.head_dim, cfg.attn_scale * cfg.head_dim**0.5
        qkv = jnp.concatenate([qkv[..., :q_out] * ratio, qkv[..., q_out:]], axis=-1)
    if block.fresh:  # positions are 0 .. T-1 in every row: the kernel's prefill
        rows = B * T if block.valid is None else block.valid
        out, *new_kv = cpu_kernels.prefill_attention(
            qkv, cos[0], sin[0], rows, cfg.num_heads, cfg.num_kv_heads, window
        )
        return out, tuple(new_kv)
    if T == 1:  # decode: the kernel writes the cache in place and attends
        out, *new_kv = cpu_kernels.decode_attention(
            qkv[:, 0],
            cos[:, 0],
            sin[:, 0],
            block.positions[:, 0],
            block.page_table,
            *cache_kv,
            cfg.num_heads,
            window,
        )
        return out[:, None], tuple(new_kv)
    if B == 1 or block.lengths is not None:  # sequences' next T positions, after their pages
        lengths = block.lengths
        if lengths is None:
            lengths = T if block.valid is None else block.valid
        out, *new_kv = cpu_kernels.extend_attention(
            qkv,
            cos,
            sin,
            block.positions[:, 0],
            lengths,
            block.page_table,
            *cache_kv,
            cfg.num_heads,
            window,
        )
        return out, tuple(new_kv)
    return None


def attend_xla(
    cfg: ModelConfig,
    dtype: jnp.dtype,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block: Rows,
    rotation: KV,
    cache_kv: KV,
    window: int | None,
) -> tuple[jax.Array, KV]:
    """The block's attention on XLA's ops from q [B, T, H D], k and v [B, T, K D], in a layer
    of sliding `window` (None: global): (out [B, T, H D], cache with the block's K/V
    written)."""
    B, T = block.tokens.shape
    cos, sin = rotation
    kv_len = block.kv_len or block.page_table.shape[1] * cache_kv[0].shape[2]
    q = rope(q.reshape(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
    k = rope(k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if block.fresh and flash_prefill():  # causal within the new tokens, no [T, T] scores
        out = jax.nn.dot_product_attention(
            q, k, v, scale=cfg.attn_scale, is_causal=True, local_window_size=_left(window)
        )
        write = lambda pool, x: write_pages(pool, x, block.positions, block.page_table)  # noqa: E731
        cache_kv = (write(cache_kv[0], k), write(cache_kv[1], v))
        return out.reshape(B, T, cfg.num_heads * cfg.head_dim), cache_kv
    q = q.reshape(B, T, cfg.num_kv_heads, cfg.kv_groups, cfg.head_dim)
    kernel = pool_kernel(window, cache_kv[0])
    attend = functools.partial(_paged, cfg, dtype, kv_len, window, kernel)
    args = (q, k, v, block.positions, block.page_table, cache_kv)
    # A fresh prefill's rows are its own scratch pool, not the cache's pages.
    out, cache_kv = attend(*args) if block.fresh else per_shard(attend, *args)
    return out.reshape(B, T, cfg.num_heads * cfg.head_dim), cache_kv


def flash_prefill() -> bool:
    """Whether a fresh prefill runs jax.nn.dot_product_attention, cuDNN's flash attention
    on a GPU, rather than XLA's ops with their [T, T] scores."""
    return jax.default_backend() == "gpu"


def pool_kernel(window: int | None, pool) -> str | None:
    """The Pallas kernel this layer's attention runs on the pool, engine.attention.pool_kernels
    ("gpu" or "tpu"), or None: XLA's ops. Pallas is imported only on an accelerator."""
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        return None
    from engine.attention import pool_kernels

    return pool_kernels.choose(backend, window, pool)


def _left(window: int | None) -> tuple[int, int] | None:
    """A sliding window as jax.nn.dot_product_attention's (keys to the left, to the right)."""
    return None if window is None else (window - 1, 0)


def _paged(cfg, dtype, kv_len: int, window, kernel, q, k, v, positions, page_table, cache_kv):
    """Write k, v into the pages, then each row attends to the kv_len positions its pages
    hold: through jax's paged kernel where one applies, else gather them and take a masked
    float32 softmax. (out [B, T, K, G, D], cache)."""
    T = q.shape[1]
    k_cache = write_pages(cache_kv[0], k, positions, page_table)
    v_cache = write_pages(cache_kv[1], v, positions, page_table)
    if kernel is not None:
        from engine.attention.pool_kernels import attend_pool

        out = attend_pool(
            kernel, q, k_cache, v_cache, positions, page_table, kv_len, cfg.attn_scale
        )
        return out, (k_cache, v_cache)
    keys = read_pages(k_cache, page_table, kv_len, dtype)
    values = read_pages(v_cache, page_table, kv_len, dtype)
    mask = attention_mask(positions, kv_len, window)
    if T == 1 and jax.default_backend() == "cpu":
        out = _cpu_decode_attention(q[:, 0], keys, values, mask[:, 0], dtype, cfg.attn_scale)
        out = out[:, None]
    else:
        scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=F32)
        scores = scores * cfg.attn_scale
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
    return out, (k_cache, v_cache)


def _cpu_decode_attention(q, keys, values, mask, dtype, scale: float) -> jax.Array:
    """One token per row as broadcast multiply-reduces, in [B, K, G, S] throughout.

    q [B, K, G, D], keys / values [B, K, S, D], mask [B, S] -> [B, K, G, D]. XLA CPU ran the
    batched [G, D] x [D, S] dots of a single token well below memory speed (a third slower
    at batch 32); TPU/GPU keep the dots, which their matrix units run."""
    q = q.astype(F32) * scale
    scores = jnp.sum(q[:, :, :, None, :] * keys[:, :, None].astype(F32), axis=-1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.sum(probs[..., None] * values[:, :, None], axis=-2)
