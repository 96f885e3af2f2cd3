"""The sampling step at Gemma 3's 262,144-token vocabulary: the surviving distribution of
every filter equals the sort-based reference (candidate path, wide candidates and the full
sort all taken), greedy and seeded draws, and one compiled program for every mix of rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import SamplingParams, make_row
from samplers.pipeline import filtered_logits, sample
from tests.test_samplers_support import reference_probs

V, ROWS, BIAS = 262_144, 4, 4
RNG = np.random.default_rng(262)
FILTERED = jax.jit(filtered_logits)
SAMPLE = jax.jit(sample, static_argnames=("num_logprobs",))


def batch(params: list[SamplingParams]):
    rows = [make_row(p, V, BIAS, (), 0) for p in params]
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *rows)


def logits() -> np.ndarray:
    """Rows a real model gives: peaked (a few tokens hold the mass), flat (top_p reaches past
    any candidate set), a long Zipf tail, and a row with many exact ties."""
    peaked = RNG.normal(size=V) * 2.0
    peaked[RNG.choice(V, 5, replace=False)] += 12
    flat = RNG.normal(size=V) * 0.3
    zipf = -1.1 * np.log(RNG.permutation(V) + 1.0)
    ties = np.round(RNG.normal(size=V) * 2) / 2
    return np.stack([peaked, flat, zipf, ties]).astype(np.float32)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.9),
        dict(temperature=0.7, top_k=64, top_p=0.95),  # Gemma's defaults
        dict(min_p=0.02),
        dict(typical_p=0.9),
        dict(temperature=1.3, top_p=0.99, min_p=0.001),
    ],
)
def test_filters_equal_the_sort_based_reference(kw):
    x = logits()
    got = np.asarray(FILTERED(jnp.asarray(x), batch([SamplingParams(**kw)] * ROWS)))
    for r in range(ROWS):
        want = reference_probs(x[r], **kw)
        z = got[r].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        # float32 sums against the reference's float64: a token whose mass before it is
        # within rounding of top_p may fall on either side of the cut, nothing else.
        differ = np.nonzero((p > 0) != (want > 0))[0]
        assert all(_at_the_top_p_cut(x[r], kw, t) for t in differ), (r, kw, differ)
        keep = (p > 0) & (want > 0)
        np.testing.assert_allclose(
            p[keep] / p[keep].sum(), want[keep] / want[keep].sum(), atol=1e-6
        )


def _at_the_top_p_cut(x: np.ndarray, kw: dict, token: int) -> bool:
    if "top_p" not in kw or len(kw) > 1:
        return False
    q = np.exp(x.astype(np.float64) - x.max())
    q /= q.sum()
    order = np.lexsort((np.arange(len(x)), -q))
    before = np.cumsum(q[order]) - q[order]
    return abs(before[np.nonzero(order == token)[0][0]] - kw["top_p"]) < 1e-5


def test_one_program_serves_every_mix_and_greedy_is_the_argmax():
    x = jnp.asarray(logits())
    mixes = [
        [SamplingParams(temperature=0.0)] * ROWS,
        [SamplingParams(top_p=0.9, seed=1), SamplingParams(temperature=0.0)] * 2,
        [SamplingParams(top_k=64, top_p=0.95, min_p=0.05, seed=i) for i in range(ROWS)],
        [SamplingParams(mirostat_target=3.0, seed=i) for i in range(ROWS)],
    ]
    SAMPLE(x, batch(mixes[0]), num_logprobs=5)
    compiled = SAMPLE._cache_size()  # shared with other jits of sample() in the process
    for params in mixes:
        tokens, info, _ = SAMPLE(x, batch(params), num_logprobs=5)
        for r, p in enumerate(params):
            if p.temperature == 0.0:
                assert int(tokens[r]) == int(np.argmax(np.asarray(x[r])))
            else:  # a drawn token lies in the row's surviving set
                kw = {k: getattr(p, k) for k in ("top_p", "top_k", "min_p")}
                allowed = reference_probs(np.asarray(x[r]), **kw) > 0
                assert p.mirostat_target is not None or allowed[int(tokens[r])]
    assert SAMPLE._cache_size() == compiled  # nothing recompiled for new parameters
