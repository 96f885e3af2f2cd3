"""Mirostat 2.0 (docs/sampling.md 3.2) on the distribution the truncation filters left.

Truncation keeps the tokens whose surprise -log2 q is <= mu (at least the most probable one);
after the draw of token x from the renormalised survivors, mu <- mu - lr * (-log2 q_x - target).
"""

import jax
import jax.numpy as jnp

from samplers.filters import Candidates

LN2 = 0.6931471805599453


def truncate(c: Candidates, on: jax.Array, mu: jax.Array) -> Candidates:
    """on: bool[S]; mu: f32[S] in bits. Keep ln q_i >= -mu ln 2."""
    floor = jnp.where(on, -mu * LN2, -jnp.inf)
    lnz = c.log_mass()
    keep = c.keep & ((c.z - lnz[:, None] >= floor[:, None]) | c.first_kept())
    return c.update(keep, on, spill=on & (c.tail_max - lnz >= floor))


def update_mu(
    mu: jax.Array, lr: jax.Array, target: jax.Array, logprob: jax.Array, on: jax.Array
) -> jax.Array:
    """mu, lr, target, logprob (natural log of q_x): f32[S]; rows where `on` is False keep mu."""
    surprise = -logprob / LN2
    return jnp.where(on, mu - lr * (surprise - target), mu)
