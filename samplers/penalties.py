"""Repetition, frequency and presence penalties (docs/sampling.md 1.8, 1.9)."""

import jax
import jax.numpy as jnp


def repetition(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL-style, once per distinct token seen in prompt or output.

    logits: f32[S, V]; seen: bool[S, V]; penalty: f32[S] (1 = off). Positive logits are
    divided by the penalty and the others multiplied, so r > 1 always makes a token less likely.
    """
    r = penalty[:, None]
    return jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)


def frequency_presence(
    logits: jax.Array, counts: jax.Array, frequency: jax.Array, presence: jax.Array
) -> jax.Array:
    """OpenAI's definition over generated tokens only: l - c*freq - [c > 0]*pres.

    logits: f32[S, V]; counts: i32[S, V]; frequency, presence: f32[S].
    """
    c = counts.astype(logits.dtype)
    return logits - c * frequency[:, None] - (counts > 0) * presence[:, None]
