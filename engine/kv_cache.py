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


def write_positions(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new[b, t] (Float[B, T, kv_heads, head_dim]) into buf[b, :, positions[b, t]]:
    the batch's B rows are the buffer's first B rows.

    Positions past max_len (bucket padding) are dropped by the scatter.
    """
    new = new.astype(buf.dtype)
    if new.shape[0] == 1:
        # A one-row write would become a dynamic-update-slice, which XLA then fuses into
        # the attention's read of the cache; the fused copy reads the old buffer and
        # forces a copy of every layer's K and V each step. A second row aimed past the
        # buffer (dropped) keeps it a scatter, updated in place.
        new = jnp.concatenate([new, new])
        positions = jnp.concatenate([positions, positions])
        rows = jnp.asarray([[0], [buf.shape[0]]])
    else:
        rows = jnp.arange(new.shape[0])[:, None]
    return buf.at[rows, :, positions].set(new, mode="drop")
