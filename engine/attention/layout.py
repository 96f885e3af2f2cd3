"""The paged KV cache layout every attention implementation reads, and the write into it.

    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]

Combined head 2h holds K of kv head h and 2h + 1 its V. This is the layout of jax's TPU
ragged paged attention kernel (one DMA per page brings a page's K and V together), so the TPU
path reads the cache as is; the reference reads it directly too, and the GPU path converts
(gpu.py). One array per layer, as in kv_cache.py, so XLA can update each layer in place.

Slot p*page_size + o is offset o of page p. Sequence s owns pages page_indices[s, :] in order,
so its token at position t lives in slot page_indices[s, t // page_size] * page_size
+ t % page_size. Unused page-table entries must still be valid page ids (0 will do): the
kernels load whole blocks of pages and mask the tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    kv_pages: jax.Array, k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array
) -> jax.Array:
    """Scatter new tokens' K/V into their slots; returns the updated pool.

    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
    k_new, v_new: [T, num_kv_heads, head_dim]
    slot_mapping: i32[T]; slot = page_id * page_size + offset, negative for padding rows,
        which are dropped (a negative index would otherwise wrap around onto a real slot).
    Donate kv_pages to the enclosing jit so the scatter runs in place.
    """
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_slots = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range -> dropped
    flat = kv_pages.reshape(num_slots, combined, head_dim)
    flat = flat.at[slots].set(fuse_kv(k_new, v_new).astype(kv_pages.dtype), mode="drop")
    return flat.reshape(kv_pages.shape)
