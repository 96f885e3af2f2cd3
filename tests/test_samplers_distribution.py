"""The drawn distribution: 21,000 draws per configuration against an independent numpy
reference, and mirostat's observed surprise converging to its target.

One scan of sample() steps serves every check: rows 0-27 hold four configurations (7 rows
each, one draw per row and step), rows 28-31 run mirostat on a Zipf distribution.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import SamplingParams, fork_row
from samplers.pipeline import sample
from tests.test_samplers_support import (
    CANDIDATES,
    VOCAB,
    batch_of,
    pad_logits,
    reference_probs,
)

STEPS = 3000
L = [2.0, 1.0, 0.0, -1.0]
RNG = np.random.default_rng(5)
WIDE = (RNG.normal(size=VOCAB) * 1.5).astype(np.float32)
# Zipf over 60 tokens (entropy 5.69 bits), so mirostat's set fits in the candidates.
ZIPF = np.full(VOCAB, -np.inf, np.float32)
ZIPF[:60] = -0.5 * np.log(np.arange(1, 61))
CONFIGS = [  # (logits, params): order matters in the first two (docs/sampling.md 2.2)
    (L, dict(min_p=0.2, temperature=2.0)),  # temperature first: all 4 tokens survive
    (L, dict(top_p=0.7)),  # [0.7311, 0.2689, 0, 0]
    (WIDE, dict()),  # untruncated: most draws come from outside the 64 candidates
    (WIDE, dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, typical_p=0.9)),
]
TAUS = [3.0, 3.0, 5.0, 5.0]  # rows 28, 29 (forked choices of one request), 30, 31


@pytest.fixture(scope="module")
def draws():
    params, logits = [], []
    for i, (lg, kw) in enumerate(CONFIGS):
        params += [SamplingParams(seed=100 * i + r, **kw) for r in range(7)]
        logits += [pad_logits([lg], 1)[0]] * 7
    params += [SamplingParams(mirostat_target=t, seed=9 + i) for i, t in enumerate(TAUS)]
    logits += [jnp.asarray(ZIPF)] * 4
    batch = fork_row(batch_of(params, VOCAB), 28, 29, 1)
    return jax.tree.map(np.asarray, _run(jnp.stack(logits), batch))


@jax.jit
def _run(logits, batch):
    """STEPS sample() steps in one program: tokens, surprise in bits and mu, each [STEPS, S]."""

    def step(batch, _):
        tokens, info, batch = sample(logits, batch, num_candidates=CANDIDATES)
        return batch, (tokens, -info.sampling_logprob / math.log(2), batch.mirostat_mu)

    return jax.lax.scan(step, batch, length=STEPS)[1]


def chi2_limit(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at about 3e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_draws_follow_the_reference_distribution(draws, index):
    tokens = draws[0][:, 7 * index : 7 * index + 7].reshape(-1)
    lg, kw = CONFIGS[index]
    p = reference_probs(
        np.pad(np.asarray(lg, float), (0, VOCAB - len(lg)), constant_values=-np.inf), **kw
    )
    counts = np.bincount(tokens, minlength=VOCAB)
    n = len(tokens)
    assert counts[p == 0].sum() == 0  # nothing outside the surviving set
    expected = n * p
    big = expected >= 5  # pool the rare tokens into one cell
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    chi2 = np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])
    assert chi2 < chi2_limit(keep.sum() - 1), (chi2, keep.sum())


def test_order_sensitive_frequencies(draws):
    """Test 41 / 43 as frequencies: token 3 at ~0.1015 with min_p after temperature."""
    tokens = draws[0]
    f41 = np.bincount(tokens[:, :7].reshape(-1), minlength=4)[:4] / (7 * STEPS)
    np.testing.assert_allclose(f41, [0.4551, 0.2760, 0.1674, 0.1015], atol=0.012)
    f43 = np.bincount(tokens[:, 7:14].reshape(-1), minlength=4)[:4] / (7 * STEPS)
    np.testing.assert_allclose(f43, [0.7311, 0.2689, 0, 0], atol=0.012)


def test_mirostat_surprise_converges_to_target(draws):
    _, surprise, mu = draws
    for row, tau in zip(range(28, 32), TAUS, strict=True):
        assert abs(surprise[-2000:, row].mean() - tau) < 0.1, (row, surprise[-2000:, row].mean())
    assert not np.allclose(mu[:, 28], mu[:, 29])  # forked choices keep their own mu
