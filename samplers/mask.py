"""Grammar masks (docs/sampling.md 2.1): a packed per-row bitmask of the tokens a row may draw.

`allowed` is i32[S, W] with W = ceil(V / 32): bit j of word i allows token 32 * i + j (the
layout llguidance fills). An unconstrained row is all ones, so one compiled program serves
every mix of constrained and free rows. The mask applies after logit_bias and before
temperature, so every filter and the draw see only the allowed tokens.
"""

import jax
import jax.numpy as jnp

from samplers.branching import when
from samplers.filters import NEG_INF


def words(vocab_size: int) -> int:
    """W: the int32 words of one row's mask."""
    return (vocab_size + 31) // 32


def constrained(allowed: jax.Array) -> jax.Array:
    """bool[S]: the rows whose mask forbids some token."""
    return jnp.any(allowed != -1, axis=-1)


def unpack(allowed: jax.Array, vocab_size: int) -> jax.Array:
    """i32[S, W] -> bool[S, V]: token t allowed."""
    s, w = allowed.shape
    bits = jnp.right_shift(allowed[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(s, w * 32)[:, :vocab_size].astype(bool)


def apply(x: jax.Array, allowed: jax.Array, *, branchless: bool = False) -> jax.Array:
    """x: f32[S, V] -> x with the forbidden tokens at -inf. Skips the pass over the vocabulary
    when no row is constrained (the common batch), unless `branchless` (samplers.branching)."""

    def masked(x: jax.Array) -> jax.Array:
        return jnp.where(unpack(allowed, x.shape[1]), x, NEG_INF)

    return when(jnp.any(constrained(allowed)), masked, lambda x: x, x, branchless=branchless)
