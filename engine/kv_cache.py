"""The preallocated KV cache: one K and one V buffer per layer.

Each buffer is laid out [slots, kv_heads, max_len, head_dim]. Separate per-layer buffers
(rather than one stacked [layers, ...] array) let XLA update each layer in place; a
stacked cache made it copy every layer's K and V each decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.config import ModelConfig

# One (k, v) pair per layer, each Float[slots, kv_heads, max_len, head_dim].
KVCache = list[tuple[jax.Array, jax.Array]]


def init_cache(config: ModelConfig, slots: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    shape = (slots, config.num_kv_heads, max_len, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


def write_positions(
    buf: jax.Array, new: jax.Array, positions: jax.Array, first_row: jax.Array | int = 0
) -> jax.Array:
    """Scatter new[b, t] (Float[B, T, kv_heads, head_dim]) into
    buf[first_row + b, :, positions[b, t]]: the batch's B rows are the buffer's rows from
    `first_row` (an int32 scalar, may be traced) on.

    Positions past max_len (bucket padding) are dropped by the scatter.
    """
    # One extra row aimed past the buffer (dropped) keeps the write a scatter, updated in
    # place: XLA turned a one-row write into a dynamic-update-slice and fused a copy of it
    # into the attention's read of the cache, which then forced a copy of every layer's K
    # and V each step.
    rows = jnp.append(first_row + jnp.arange(new.shape[0]), buf.shape[0])[:, None]
    new = jnp.concatenate([new, new[:1]]).astype(buf.dtype)
    positions = jnp.concatenate([positions, positions[:1]])
    return buf.at[rows, :, positions].set(new, mode="drop")
