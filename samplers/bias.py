"""logit_bias (docs/sampling.md 1.10): a sparse per-row additive bias."""

import jax
import jax.numpy as jnp


def apply(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """logits: f32[S, V]; ids: i32[S, B]; values: f32[S, B]. Padding entries add 0.0."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].add(values)
