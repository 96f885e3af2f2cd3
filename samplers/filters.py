"""Temperature and the truncation filters top_k, top_p, min_p, typical_p (docs/sampling.md 1.3-1.7).

The filters work on `Candidates`: the C highest logits of each row in descending order (ties:
lower token id first) plus a summary of the V - C tokens left out (the "tail"). With C = V the
tail is empty and each filter is its exact sort-based definition. With C < V a filter either
proves that its result lies inside the candidates (the tail is then dropped), or, while it is
still a no-op, keeps the whole tail, or sets `fail` so that the caller recomputes the row with
C = V. Every filter sees the distribution renormalised over the survivors of the previous one.
"""

import dataclasses

import jax
import jax.numpy as jnp

from samplers.branching import when
from samplers.params import GREEDY_TEMPERATURE

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
    """The current surviving set of each row. S = rows, C = candidates."""

    z: jax.Array  # f32[S, C]; temperature-scaled logits, descending
    keep: jax.Array  # bool[S, C]; candidate still survives
    tail_on: jax.Array  # bool[S]; every non-candidate token still survives
    tail_lse: jax.Array  # f32[S]; log sum exp(z) over the non-candidates (-inf if none)
    tail_mean: jax.Array  # f32[S]; mean of z over the non-candidates under softmax
    tail_max: jax.Array  # f32[S]; largest z among the non-candidates (-inf if none)
    fail: jax.Array  # bool[S]; the result may reach past the candidates

    def log_mass(self) -> jax.Array:
        """f32[S]: log of the unnormalised mass of the surviving set."""
        head = jax.nn.logsumexp(jnp.where(self.keep, self.z, NEG_INF), axis=-1)
        return jnp.logaddexp(head, jnp.where(self.tail_on, self.tail_lse, NEG_INF))

    def first_kept(self) -> jax.Array:
        """bool[S, C]: the most probable survivor, which no filter removes."""
        pos = jnp.argmax(self.keep, axis=-1)
        return jnp.arange(self.z.shape[1])[None, :] == pos[:, None]

    def update(self, keep: jax.Array, on: jax.Array, spill: jax.Array) -> "Candidates":
        """A filter that is `on` in a row drops the tail there unless it `spill`s into it."""
        return dataclasses.replace(
            self, keep=keep, tail_on=self.tail_on & ~on, fail=self.fail | (spill & self.tail_on)
        )


def temperature(logits: jax.Array, t: jax.Array) -> jax.Array:
    """logits: f32[S, N], t: f32[S] -> l / T. Greedy rows (T < 1e-5) are left unscaled."""
    t = jnp.where(t < GREEDY_TEMPERATURE, 1.0, t)
    return logits / t[:, None]


def top_k(c: Candidates, k: jax.Array) -> Candidates:
    """Keep z >= the k-th largest z (ties kept). k: i32[S]; 0 = off."""
    on = k > 0
    kth = jnp.clip(k, 1, c.z.shape[1]) - 1
    thr = jnp.take_along_axis(c.z, kth[:, None], axis=-1)[:, 0]
    keep = c.keep & (~on[:, None] | (c.z >= thr[:, None]))
    # With a tail, the k-th largest lies among the candidates only if k <= C; ties with it may
    # continue into the tail.
    return c.update(keep, on, spill=on & ((k > c.z.shape[1]) | (c.tail_max >= thr)))


def top_p(c: Candidates, p: jax.Array) -> Candidates:
    """Keep the shortest descending prefix whose mass reaches p (at least one token).

    p: f32[S]; 1 = off. A token is kept iff the mass strictly before it is < p.
    """
    on = p < 1.0
    q = jnp.where(c.keep, jnp.exp(c.z - c.log_mass()[:, None]), 0.0)
    cum = jnp.cumsum(q, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    keep = c.keep & (~on[:, None] | (before < p[:, None]) | c.first_kept())
    return c.update(keep, on, spill=on & (cum[:, -1] < p))


def min_p(c: Candidates, m: jax.Array) -> Candidates:
    """Keep p_i >= m * max p, i.e. z_i - z_max >= ln m. m: f32[S]; 0 = off."""
    on = m > 0.0
    z_max = jnp.max(jnp.where(c.keep, c.z, NEG_INF), axis=-1)
    floor = jnp.log(m)  # -inf when off
    keep = c.keep & (c.z - z_max[:, None] >= floor[:, None])
    return c.update(keep, on, spill=on & (c.tail_max - z_max >= floor))


def typical_p(c: Candidates, t: jax.Array, *, branchless: bool = False) -> Candidates:
    """Locally typical sampling, HF's definition (docs/sampling.md 1.7). t: f32[S]; 1 = off.

    score_i = |-ln p_i - H| = |z_i - centre| with centre = ln Z - H. Tokens are taken by
    ascending score until the mass reaches t; every token scoring <= that last one is kept.
    Non-candidates have z <= tail_max, so if centre > tail_max their scores are all
    >= centre - tail_max: a cut made among lower-scoring candidates excludes the whole tail.
    """
    on = t < 1.0
    # Sorting by score is the costly part: skip it when no row asks for typical_p.
    return when(jnp.any(on), _typical_p, lambda c, t, on: c, c, t, on, branchless=branchless)


def _typical_p(c: Candidates, t: jax.Array, on: jax.Array) -> Candidates:
    lnz = c.log_mass()
    q = jnp.where(c.keep, jnp.exp(c.z - lnz[:, None]), 0.0)
    tail_q = jnp.where(c.tail_on, jnp.exp(c.tail_lse - lnz), 0.0)
    head_qz = jnp.sum(jnp.where(q > 0, q * c.z, 0.0), axis=-1)
    centre = head_qz + jnp.where(tail_q > 0, tail_q * c.tail_mean, 0.0)  # E[z] = ln Z - H
    score = jnp.where(c.keep, jnp.abs(c.z - centre[:, None]), jnp.inf)
    order = jnp.argsort(score, axis=-1, stable=True)
    s_sorted = jnp.take_along_axis(score, order, axis=-1)
    cum = jnp.cumsum(jnp.take_along_axis(q, order, axis=-1), axis=-1)
    last = jnp.sum(cum < t[:, None], axis=-1)  # first index where the mass reaches t
    thr = jnp.take_along_axis(s_sorted, jnp.minimum(last, c.z.shape[1] - 1)[:, None], -1)[:, 0]
    keep = c.keep & (~on[:, None] | (score <= thr[:, None]))
    clean = jnp.sum(s_sorted < (centre - c.tail_max)[:, None], axis=-1)  # before any tail token
    return c.update(keep, on, spill=on & (last >= clean))
