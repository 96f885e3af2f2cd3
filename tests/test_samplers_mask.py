"""The grammar mask in the sampling step (docs/sampling.md 1.25, 2.1): penalties -> bias -> mask
-> temperature -> filters, each held to an independent numpy reference on random logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import SamplingParams, mask
from samplers.pipeline import sample
from tests.test_samplers_distribution import chi2_limit
from tests.test_samplers_support import (
    CANDIDATES,
    SLOTS,
    VOCAB,
    batch_of,
    reference_probs,
    run_filtered,
    run_sample,
)

W = mask.words(VOCAB)
RNG = np.random.default_rng(11)


def pack(allowed: np.ndarray) -> np.ndarray:
    """bool[S, V] -> i32[S, W], bit j of word i allowing token 32 i + j (llguidance's layout),
    written from the definition. The bits past V are set: an all-allowed row is all ones."""
    s, v = allowed.shape
    words = np.zeros((s, W), np.uint32)
    allowed = np.concatenate([allowed, np.ones((s, 32 * W - v), bool)], axis=1)
    for t in range(32 * W):
        words[:, t // 32] |= allowed[:, t].astype(np.uint32) << np.uint32(t % 32)
    return words.view(np.int32)


def free_rows(s: int = SLOTS) -> np.ndarray:
    return np.ones((s, VOCAB), bool)


# Allowed sets that take each path of the sampler: a few tokens among the candidates, many
# reaching past them into the tail, only low-ranked (tail) tokens, a single token.
def _sets(logits: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(-logits, kind="stable")
    few = np.zeros(VOCAB, bool)
    few[RNG.choice(VOCAB, 5, replace=False)] = True
    many = RNG.random(VOCAB) < 0.6
    low = np.zeros(VOCAB, bool)
    low[order[300:340]] = True
    one = np.zeros(VOCAB, bool)
    one[order[-1]] = True
    return [few, many, low, one]


PARAMS = [
    dict(),
    dict(temperature=0.7, top_k=20),
    dict(top_p=0.9),
    dict(temperature=1.3, min_p=0.05),
    dict(typical_p=0.8),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.01, typical_p=0.9),
]


def test_unpack_is_the_bit_layout():
    allowed = RNG.random((SLOTS, VOCAB)) < 0.3
    got = jax.jit(mask.unpack, static_argnums=1)(jnp.asarray(pack(allowed)), VOCAB)
    np.testing.assert_array_equal(np.asarray(got), allowed)
    assert not np.asarray(mask.constrained(jnp.asarray(pack(free_rows())))).any()


@pytest.mark.parametrize("kw", PARAMS)
def test_filtered_distribution_is_the_reference_on_the_allowed_tokens(kw):
    logits = (RNG.normal(size=(SLOTS, VOCAB)) * 2).astype(np.float32)
    allowed = free_rows()
    rows = []
    for r in range(SLOTS - 1):
        allowed[r] = _sets(logits[r])[r % 4]
        rows.append(r)
    params = [SamplingParams(seed=r, **kw) for r in range(SLOTS)]
    batch = batch_of(params, VOCAB)
    got = np.asarray(run_filtered(jnp.asarray(logits), batch, pack(allowed)))
    for r in range(SLOTS):
        masked = np.where(allowed[r], logits[r], -np.inf)
        want = reference_probs(masked, **kw)
        z = got[r].astype(np.float64)
        p = np.exp(z - z.max())
        np.testing.assert_allclose(p / p.sum(), want, atol=2e-6, err_msg=f"row {r} {kw}")


def test_bias_cannot_revive_a_forbidden_token_and_penalties_come_first():
    logits = RNG.normal(size=(SLOTS, VOCAB)).astype(np.float32)
    allowed = free_rows()
    allowed[:, :10] = False
    # +100 on forbidden token 3 and on allowed token 20; a repetition penalty on token 20.
    params = [
        SamplingParams(seed=r, logit_bias={3: 100.0, 20: 5.0}, repetition_penalty=1.5)
        for r in range(SLOTS)
    ]
    batch = batch_of(params, VOCAB, prompts=[(20,)] * SLOTS)
    got = np.asarray(run_filtered(jnp.asarray(logits), batch, pack(allowed)))
    for r in range(SLOTS):
        x = logits[r].astype(np.float64)
        x[20] = x[20] / 1.5 if x[20] > 0 else x[20] * 1.5  # repetition, then bias
        x[3] += 100.0
        x[20] += 5.0
        want = reference_probs(np.where(allowed[r], x, -np.inf))
        p = np.exp(got[r] - got[r].max())
        np.testing.assert_allclose(p / p.sum(), want, atol=2e-6)
        assert want[3] == 0.0


def test_free_rows_are_bit_for_bit_unchanged_and_raw_logprobs_stay_raw():
    logits = jnp.asarray((RNG.normal(size=(SLOTS, VOCAB)) * 2).astype(np.float32))
    params = [SamplingParams(seed=r, temperature=0.9, top_p=0.95) for r in range(SLOTS)]
    params[5] = SamplingParams(temperature=0.0)
    batch = batch_of(params, VOCAB)
    allowed = free_rows()
    constrained = [0, 5, 9, 17]
    for r in constrained:
        allowed[r] = _sets(np.asarray(logits[r]))[r % 4]
    free = [r for r in range(SLOTS) if r not in constrained]
    t0, info0, b0 = run_sample(logits, batch)
    t1, info1, b1 = run_sample(logits, batch, pack(allowed))
    for a, b in [(t0, t1), (info0.sampling_logprob, info1.sampling_logprob)]:
        np.testing.assert_array_equal(np.asarray(a)[free], np.asarray(b)[free])
    # raw logprobs never see the mask, in any row
    np.testing.assert_array_equal(np.asarray(info0.top_ids), np.asarray(info1.top_ids))
    np.testing.assert_array_equal(np.asarray(info0.top_logprobs), np.asarray(info1.top_logprobs))
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    t1 = np.asarray(t1)
    np.testing.assert_allclose(
        np.asarray(info1.token_logprob), raw[np.arange(SLOTS), t1], rtol=1e-6, atol=1e-6
    )
    for r in constrained:
        assert allowed[r, t1[r]], r
    # the greedy constrained row takes the best allowed token, with sampling_logprob 0
    best = np.argmax(np.where(allowed[5], np.asarray(logits[5]), -np.inf))
    assert t1[5] == best and float(info1.sampling_logprob[5]) == 0.0
    # sampling_logprob is under the masked distribution the row drew from
    for r in (0, 9, 17):
        x = np.where(allowed[r], np.asarray(logits[r], np.float64), -np.inf)
        want = reference_probs(x, temperature=0.9, top_p=0.95)
        assert math.isclose(float(info1.sampling_logprob[r]), math.log(want[t1[r]]), abs_tol=1e-4)


STEPS = 1500


@jax.jit
def _draws(logits, batch, allowed):
    def step(batch, _):
        tokens, _, batch = sample(logits, batch, num_candidates=CANDIDATES, allowed=allowed)
        return batch, tokens

    return jax.lax.scan(step, batch, length=STEPS)[1]


def test_masked_draws_follow_the_reference_distribution():
    """8 rows per allowed set (few / many / low-ranked / one), 12,000 draws each, by chi-square
    against the reference on the masked logits; not one forbidden token."""
    base = (RNG.normal(size=VOCAB) * 1.5).astype(np.float32)
    sets = _sets(base)
    allowed = np.stack([sets[r // 8] for r in range(SLOTS)])
    kw = dict(temperature=0.9, top_p=0.97)
    batch = batch_of([SamplingParams(seed=1000 + r, **kw) for r in range(SLOTS)], VOCAB)
    logits = jnp.asarray(np.broadcast_to(base, (SLOTS, VOCAB)))
    tokens = np.asarray(_draws(logits, batch, jnp.asarray(pack(allowed))))
    for g in range(4):
        drawn = tokens[:, 8 * g : 8 * g + 8].reshape(-1)
        p = reference_probs(np.where(sets[g], base, -np.inf), **kw)
        counts = np.bincount(drawn, minlength=VOCAB)
        assert counts[~sets[g]].sum() == 0, g
        expected = len(drawn) * p
        big = expected >= 5
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
        keep = expected > 0
        if keep.sum() < 2:
            assert observed[keep].sum() == len(drawn)
            continue
        chi2 = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
        assert chi2 < chi2_limit(keep.sum() - 1), (g, chi2, keep.sum())
