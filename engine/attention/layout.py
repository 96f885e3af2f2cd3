"""The paged KV cache layout every attention implementation reads, and the write into it.

    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]

Combined head 2h holds K of kv head h and 2h + 1 its V. This is the layout of jax's TPU
ragged paged attention kernel (one DMA per page brings a page's K and V together), so the TPU
path reads the cache as is; the reference reads it directly too, and the GPU path converts
(gpu.py). One array per layer, as in kv_cache.py, so XLA can update each layer in place.

An fp8 (e4m3) pool stores K as e4m3(k / k_scale) and V as e4m3(v / v_scale), saturated at
+-448 (engine.fp8, vLLM's k_scale / v_scale); every implementation reads k_scale * K and
v_scale * V. The scales are Python floats, the TPU kernel's convention.

Slot p*page_size + o is offset o of page p. Sequence s owns pages page_indices[s, :] in order,
so its token at position t lives in slot page_indices[s, t // page_size] * page_size
+ t % page_size. Unused page-table entries must still be valid page ids (0 will do): the
kernels load whole blocks of pages and mask the tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.fp8 import E4M3, from_e4m3, to_e4m3


def init_pages(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> jax.Array:
    """Zeros [num_pages, page_size, 2 * num_kv_heads, head_dim]: an empty page pool.

    Zeros, not garbage: the kernels multiply masked-out probabilities (0) by the V of unused
    slots, and 0 * NaN would leak into real rows.
    """
    return jnp.zeros((num_pages, page_size, 2 * num_kv_heads, head_dim), dtype)


def fuse_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [..., num_kv_heads, head_dim] -> [..., 2 * num_kv_heads, head_dim], K even, V odd."""
    return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def split_kv(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., 2 * num_kv_heads, head_dim] -> k, v, each [..., num_kv_heads, head_dim]."""
    return kv[..., 0::2, :], kv[..., 1::2, :]


def write_kv(
    kv_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:
    """Scatter new tokens' K/V into their slots; returns the updated pool.

    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
    k_new, v_new: [T, num_kv_heads, head_dim]
    slot_mapping: i32[T]; slot = page_id * page_size + offset, negative for padding rows,
        which are dropped (a negative index would otherwise wrap around onto a real slot).
    k_scale, v_scale: an e4m3 pool's scales (a float pool stores values as they are).
    Donate kv_pages to the enclosing jit so the scatter runs in place.
    """
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_slots = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range -> dropped
    flat = kv_pages.reshape(num_slots, combined, head_dim)
    if kv_pages.dtype == E4M3:
        new = fuse_kv(to_e4m3(k_new, k_scale), to_e4m3(v_new, v_scale))
    else:
        new = fuse_kv(k_new, v_new).astype(kv_pages.dtype)
    flat = flat.at[slots].set(new, mode="drop")
    return flat.reshape(kv_pages.shape)


def read_kv(
    kv: jax.Array, k_scale: float, v_scale: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """split_kv, an e4m3 pool's codes as their values in `dtype` (a float pool's as stored)."""
    k, v = split_kv(kv)
    if kv.dtype != E4M3:
        return k, v
    return from_e4m3(k, k_scale, dtype), from_e4m3(v, v_scale, dtype)
