"""sample(): the composed sampling step, one XLA program for every mix of requests.

Order (docs/sampling.md 2.1, binding decision 1): repetition -> frequency/presence -> logit_bias
-> grammar mask -> (greedy rows: argmax) -> / T -> top_k -> top_p -> min_p -> typical_p
-> mirostat -> draw -> state update.

Exactness without a full sort. The filters run on the C = `num_candidates` highest processed
logits (lax.top_k, ties by lower id, the same order a stable full sort gives) plus a summary of
the other V - C tokens (the tail: their log-mass, mean and largest logit).
Each filter either proves its cut lies inside the candidates, or is a no-op so far and keeps
the whole tail, or flags the row (filters.py explains each proof). If any sampling row is
flagged, lax.cond recomputes every row on `wide_candidates` (4096) the same way, and if a row is
still flagged, on a stable full sort (C = V): the same filter code with an empty tail, i.e. the
sort-based definition. Either way the result is the exact surviving set. (The middle step is
for flat distributions, say top_p 0.9 over a small model's vocabulary: a top_k of 4096 cost
54 ms at batch 32 on a 2-core CPU where XLA's full sort cost 450.)

The draw is defined the same way on both branches, so a row's token never depends on which
branch its batch took: Gumbel-max over the surviving candidates, with noise keyed by (row key,
step, token id), against one extra item standing for the surviving tail (its log-mass plus its
own Gumbel). If the tail wins, the token is drawn from the tail by inverse CDF (in id order).
This is exact: the max over the tail tokens of z + Gumbel is a Gumbel at the tail's log-mass.

Every conditional here (each shortcut above, and the skipped passes) is samplers.branching.when:
lax.cond, or with `branchless=True` (GPU, where a conditional syncs with the host) both sides
and a select, giving the same values bit for bit.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from samplers import bias, filters, mask, mirostat, penalties
from samplers.branching import when
from samplers.filters import NEG_INF, Candidates
from samplers.params import GREEDY_TEMPERATURE, SamplingBatch
from samplers.threefry import threefry_2x32

# (x f32[S, V], k) -> (values f32[S, k] descending, ids i32[S, k]), ties by lower id: lax.top_k,
# or a faster equivalent the caller has (the engine's CPU kernel).
TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogprobInfo:
    """Per-row logprobs of one step. N = the static number of alternatives."""

    token_logprob: jax.Array  # f32[S]; raw: log_softmax of the unprocessed logits
    top_ids: jax.Array  # i32[S, N]; raw top-N, descending, ties by lower id
    top_logprobs: jax.Array  # f32[S, N]
    sampling_logprob: jax.Array  # f32[S]; under the distribution drawn from; 0.0 when greedy


@dataclasses.dataclass(frozen=True)
class _Survivors:
    """The final set of each row: surviving candidates plus surviving tail tokens."""

    head_z: jax.Array  # f32[S, C]; scaled logits of the candidates, descending
    head_ids: jax.Array  # i32[S, C]
    head_keep: jax.Array  # bool[S, C]
    tail_mask: jax.Array  # bool[S, V]; surviving non-candidates (may also mark candidates)
    tail_lse: jax.Array  # f32[S]; their log-mass (-inf if none)


def processed_logits(
    logits: jax.Array,
    batch: SamplingBatch,
    allowed: jax.Array | None = None,
    *,
    branchless: bool = False,
) -> jax.Array:
    """f32[S, V]: raw logits after repetition, frequency/presence penalties, logit_bias and the
    grammar mask `allowed` (i32[S, W], samplers.mask; None: no row constrained)."""

    def penalized(x: jax.Array) -> jax.Array:
        seen = batch.prompt_mask | (batch.counts > 0)
        x = penalties.repetition(x, seen, batch.repetition_penalty)
        return penalties.frequency_presence(
            x, batch.counts, batch.frequency_penalty, batch.presence_penalty
        )

    # Neutral penalties leave every logit as it is (x / 1, x * 1, x - 0), so a batch without
    # any skips the pass over the [S, V] seen-mask and counts.
    any_penalty = jnp.any(
        (batch.repetition_penalty != 1)
        | (batch.frequency_penalty != 0)
        | (batch.presence_penalty != 0)
    )
    x = logits.astype(jnp.float32)
    x = when(any_penalty, penalized, lambda x: x, x, branchless=branchless)
    x = bias.apply(x, batch.bias_ids, batch.bias_values)
    return x if allowed is None else mask.apply(x, allowed, branchless=branchless)


def _processed_and_scaled(
    logits: jax.Array, batch: SamplingBatch, allowed: jax.Array | None, branchless: bool
) -> tuple[jax.Array, jax.Array]:
    """(x, x / T), each f32[S, V], computed once: without the barrier XLA fuses the penalty
    arithmetic into every consumer and redoes it per pass over the vocabulary."""
    x = processed_logits(logits, batch, allowed, branchless=branchless)
    return jax.lax.optimization_barrier((x, filters.temperature(x, batch.temperature)))


def truncate(c: Candidates, batch: SamplingBatch, *, branchless: bool = False) -> Candidates:
    """top_k -> top_p -> min_p -> typical_p -> mirostat, on the candidates."""
    c = filters.top_k(c, batch.top_k)
    c = filters.top_p(c, batch.top_p)
    c = filters.min_p(c, batch.min_p)
    c = filters.typical_p(c, batch.typical_p, branchless=branchless)
    return mirostat.truncate(c, batch.mirostat_on, batch.mirostat_mu)


def _masked_lse(z: jax.Array, mask: jax.Array) -> jax.Array:
    """f32[S]: log sum exp of z: f32[S, V] over mask: bool[S, V]."""
    return jax.nn.logsumexp(jnp.where(mask, z, NEG_INF), axis=-1)


def _scatter(ids: jax.Array, values: jax.Array, vocab: int) -> jax.Array:
    """ids: i32[S, N], values: bool[S, N] -> bool[S, V] holding values at ids, False elsewhere."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].set(values)


def candidates(
    x: jax.Array,
    z_full: jax.Array,
    temperature: jax.Array,
    num_candidates: int,
    top_k: TopK = jax.lax.top_k,
) -> tuple[Candidates, jax.Array]:
    """The top `num_candidates` of x: f32[S, V] with their tail summary (z_full = x / T).

    Returns (Candidates with nothing filtered yet, candidate ids i32[S, C]). One top_k of C + 1
    gives the candidates and the tail's largest value; the tail's mass and mean are the whole
    row's minus the candidates' (an error at the rounding level of the row's total mass).
    """
    s, v = x.shape
    c = min(num_candidates, v)
    # The barrier keeps XLA from merging later slices into top_k, which on CPU would turn it
    # back into a full sort.
    vals, ids = jax.lax.optimization_barrier(top_k(x, min(c + 1, v)))
    head_z = filters.temperature(vals[:, :c], temperature)
    none = jnp.zeros((s,), bool)
    if c < v:
        tail_max = filters.temperature(vals[:, c:], temperature)[:, 0]
        m = jnp.where(jnp.isfinite(head_z[:, :1]), head_z[:, :1], 0.0)
        mass, weighted = _mass(z_full, m)
        head_mass, head_weighted = _mass(head_z, m)
        # A tail wholly masked by a grammar has no mass (not a rounding remainder of the
        # candidates' mass, which could let the draw pick a forbidden token).
        tail = jnp.where(jnp.isfinite(tail_max), jnp.maximum(mass - head_mass, 0.0), 0.0)
        tail_lse = m[:, 0] + jnp.log(tail)
        tail_mean = jnp.where(
            tail > 0, (weighted - head_weighted) / jnp.where(tail > 0, tail, 1), 0
        )
        tail_on = ~none
    else:
        tail_lse = tail_max = jnp.full((s,), NEG_INF)
        tail_mean, tail_on = jnp.zeros((s,)), none
    keep = jnp.isfinite(head_z)  # a token a grammar forbids (-inf) never survives
    cand = Candidates(head_z, keep, tail_on, tail_lse, tail_mean, tail_max, none)
    return cand, ids[:, :c]


def _mass(z: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z: f32[S, N], shift m: f32[S, 1] -> (sum exp(z - m), sum exp(z - m) * z), each f32[S]."""
    e = jnp.exp(z - m)
    return jnp.sum(e, axis=-1), jnp.sum(jnp.where(e > 0, e * z, 0.0), axis=-1)


def full_sort_candidates(x: jax.Array, temperature: jax.Array) -> tuple[Candidates, jax.Array]:
    """All V tokens as candidates, by a stable sort (descending, ties by lower id): no tail."""
    s, v = x.shape
    iota = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (s, v))
    neg, ids = jax.lax.sort((-x, iota), dimension=1, num_keys=1, is_stable=True)
    z = filters.temperature(-neg, temperature)
    none, no_tail = jnp.zeros((s,), bool), jnp.full((s,), NEG_INF)
    keep = jnp.isfinite(z)
    return Candidates(z, keep, none, no_tail, jnp.zeros((s,)), no_tail, none), ids


def _survivors(
    x: jax.Array,
    z_full: jax.Array,
    batch: SamplingBatch,
    num_candidates: int,
    wide: int,
    top_k: TopK,
    branchless: bool,
) -> _Survivors:
    """x: processed logits f32[S, V]; z_full: x / T. Runs the filters, exactly (module doc)."""
    v = x.shape[1]
    cand, head_ids = candidates(x, z_full, batch.temperature, num_candidates, top_k)
    fast = truncate(cand, batch, branchless=branchless)
    s, c = cand.z.shape

    def candidates_only():
        # tail_mask also covers the candidates here; users mask those out (_tail_only).
        tail_lse = jnp.where(fast.tail_on, cand.tail_lse, NEG_INF)
        return fast.keep, jnp.broadcast_to(fast.tail_on[:, None], (s, v)), tail_lse

    def full_sort():
        full_cand, ids = full_sort_candidates(x, batch.temperature)
        keep = truncate(full_cand, batch, branchless=branchless).keep
        tail_mask = _scatter(ids[:, c:], keep[:, c:], v)
        # A row keeping its whole tail reuses the candidate path's tail mass, so its draw does
        # not depend on which branch the batch took.
        whole = jnp.all(keep[:, c:], axis=-1) & cand.tail_on
        tail_lse = jnp.where(whole, cand.tail_lse, _masked_lse(z_full, tail_mask))
        return keep[:, :c], tail_mask, tail_lse

    def wider():
        # The first c of the wide candidates are the candidates, in the same order.
        wide_cand, wide_ids = candidates(x, z_full, batch.temperature, wide, top_k)
        w = truncate(wide_cand, batch, branchless=branchless)

        def wide_only():
            outside = ~_scatter(wide_ids, jnp.ones_like(w.keep), v)
            tail_mask = _scatter(wide_ids[:, c:], w.keep[:, c:], v) | (w.tail_on[:, None] & outside)
            whole = jnp.all(w.keep[:, c:], axis=-1) & w.tail_on & cand.tail_on  # as full_sort
            tail_lse = jnp.where(whole, cand.tail_lse, _masked_lse(z_full, tail_mask))
            return w.keep[:, :c], tail_mask, tail_lse

        return when(jnp.any(w.fail & sampling), full_sort, wide_only, branchless=branchless)

    sampling = batch.active & (batch.temperature >= GREEDY_TEMPERATURE)
    slow = wider if c < wide < v else full_sort
    failed = jnp.any(fast.fail & sampling)
    keep, tail_mask, tail_lse = when(failed, slow, candidates_only, branchless=branchless)
    return _Survivors(cand.z, head_ids, keep, tail_mask, tail_lse)


def _tail_only(sv: _Survivors) -> jax.Array:
    """bool[S, V]: the surviving non-candidate tokens."""
    is_head = _scatter(sv.head_ids, jnp.ones_like(sv.head_keep), sv.tail_mask.shape[1])
    return sv.tail_mask & ~is_head


def filtered_logits(
    logits: jax.Array,
    batch: SamplingBatch,
    num_candidates: int = 256,
    wide_candidates: int = 4096,
    top_k: TopK = jax.lax.top_k,
    allowed: jax.Array | None = None,
    *,
    branchless: bool = False,
) -> jax.Array:
    """f32[S, V]: the logits a sampling row draws from (-inf outside its surviving set)."""
    x, z = _processed_and_scaled(logits, batch, allowed, branchless)
    sv = _survivors(x, z, batch, num_candidates, wide_candidates, top_k, branchless)
    kept = _scatter(sv.head_ids, sv.head_keep, x.shape[1]) | _tail_only(sv)
    return jnp.where(kept, z, NEG_INF)


def _uniform(batch: SamplingBatch, ids: jax.Array) -> jax.Array:
    """f32[S, N] in (0, 1): one threefry hash of (row key; choice, step, token id) per entry.

    The 64-bit counter is (choice << 24 | step, id), so every request, choice, step and token
    gets its own value whatever the batch holds (n <= 128 choices, steps < 2**24).
    """
    s, n = ids.shape
    key = (batch.key[:, :1], batch.key[:, 1:])
    hi = batch.step.astype(jnp.uint32) | (batch.choice.astype(jnp.uint32) << 24)
    # The first word of the hash of (hi, id): jax.random's threefry_2x32 of the counter
    # [hi repeated | ids] keeps it as the first half of its result.
    bits, _ = threefry_2x32(key, (jnp.broadcast_to(hi[:, None], (s, n)), ids.astype(jnp.uint32)))
    return ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def _draw(
    sv: _Survivors, z_full: jax.Array, batch: SamplingBatch, sampling: jax.Array, branchless: bool
) -> jax.Array:
    """i32[S]: a token from softmax(z) over the surviving set (module doc)."""
    s, v = z_full.shape
    # Ids V and V + 1 are not tokens: they key the tail's Gumbel and its inverse-CDF uniform.
    extra = jnp.broadcast_to(jnp.asarray([v, v + 1], jnp.int32), (s, 2))
    u = _uniform(batch, jnp.concatenate([sv.head_ids, extra], axis=1))
    gumbel = -jnp.log(-jnp.log(u[:, :-1]))
    score = jnp.where(sv.head_keep, sv.head_z + gumbel[:, :-1], NEG_INF)
    pos = jnp.argmax(score, axis=-1)
    head_token = jnp.take_along_axis(sv.head_ids, pos[:, None], axis=-1)[:, 0]
    tail_wins = sampling & (sv.tail_lse + gumbel[:, -1] > jnp.max(score, axis=-1))

    def tail_token():
        mask = _tail_only(sv)
        w = jnp.where(mask, jnp.exp(z_full - sv.tail_lse[:, None]), 0.0)
        cum = jnp.cumsum(w, axis=-1)
        idx = jnp.sum(cum <= u[:, -1:] * cum[:, -1:], axis=-1)
        last = v - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)  # guard against rounding
        return jnp.minimum(idx, last).astype(jnp.int32)

    none = lambda: jnp.zeros((s,), jnp.int32)  # noqa: E731
    tail = when(jnp.any(tail_wins), tail_token, none, branchless=branchless)
    return jnp.where(tail_wins, tail, head_token)


def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    num_logprobs: int = 0,
    num_candidates: int = 256,
    wide_candidates: int = 4096,
    top_k: TopK = jax.lax.top_k,
    logprob_rows: jax.Array | None = None,
    allowed: jax.Array | None = None,
    *,
    branchless: bool = False,
) -> tuple[jax.Array, LogprobInfo, SamplingBatch]:
    """One sampling step for every slot.

    logits: f32[S, V] raw model logits; batch: S slots. `num_logprobs` (N), `num_candidates`
    and `wide_candidates` are static; `top_k` is lax.top_k or an equivalent (TopK).
    `logprob_rows` (bool[S], None = all) marks the rows whose caller reads the raw logprobs
    (token_logprob, top_ids, top_logprobs); when no active row does, they are zeros and
    their passes over the vocabulary are skipped. `allowed` (i32[S, W], samplers.mask; None =
    every token) is each row's grammar mask: the draw and sampling_logprob see only the
    allowed tokens, the raw logprobs do not. `branchless` (static) replaces every conditional
    by both sides and a select, with the same values (samplers.branching). Returns tokens
    i32[S], LogprobInfo and the batch with counts, step and mirostat mu advanced in the
    active rows (inactive rows untouched).
    """
    raw = logits.astype(jnp.float32)
    x, z = _processed_and_scaled(raw, batch, allowed, branchless)
    greedy = batch.temperature < GREEDY_TEMPERATURE
    sampling = batch.active & ~greedy

    def draw() -> tuple[jax.Array, jax.Array]:
        sv = _survivors(x, z, batch, num_candidates, wide_candidates, top_k, branchless)
        drawn = _draw(sv, z, batch, sampling, branchless)
        tokens = jnp.where(greedy, sv.head_ids[:, 0], drawn)  # head_ids[:, 0] = argmax of x
        head_lse = jax.nn.logsumexp(jnp.where(sv.head_keep, sv.head_z, NEG_INF), axis=-1)
        norm = jnp.logaddexp(head_lse, sv.tail_lse)
        return tokens, jnp.take_along_axis(z, tokens[:, None], -1)[:, 0] - norm

    def argmax_only() -> tuple[jax.Array, jax.Array]:
        # No row samples: skip the candidate search (argmax ties go to the lower id,
        # as in the candidates' order).
        return jnp.argmax(x, axis=-1).astype(jnp.int32), jnp.zeros(x.shape[0], jnp.float32)

    tokens, log_q = when(jnp.any(sampling), draw, argmax_only, branchless=branchless)

    def raw_logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        raw_lse = jax.nn.logsumexp(raw, axis=-1)
        top_logits, top_ids = top_k(raw, num_logprobs)
        chosen = jnp.take_along_axis(raw, tokens[:, None], -1)[:, 0] - raw_lse
        return chosen, top_ids, top_logits - raw_lse[:, None]

    def no_logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        s = raw.shape[0]
        return (
            jnp.zeros((s,), jnp.float32),
            jnp.zeros((s, num_logprobs), jnp.int32),
            jnp.zeros((s, num_logprobs), jnp.float32),
        )

    wanted = batch.active if logprob_rows is None else batch.active & logprob_rows
    token_logprob, top_ids, top_logprobs = when(
        jnp.any(wanted), raw_logprobs, no_logprobs, branchless=branchless
    )
    info = LogprobInfo(
        token_logprob=token_logprob,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        sampling_logprob=jnp.where(greedy, 0.0, log_q),
    )

    active = batch.active
    rows = jnp.arange(raw.shape[0])
    new_batch = dataclasses.replace(
        batch,
        counts=batch.counts.at[rows, tokens].add(active.astype(jnp.int32)),
        step=batch.step + active.astype(jnp.int32),
        mirostat_mu=mirostat.update_mu(
            batch.mirostat_mu,
            batch.mirostat_lr,
            batch.mirostat_target,
            log_q,
            sampling & batch.mirostat_on,
        ),
    )
    return tokens, info, new_batch
