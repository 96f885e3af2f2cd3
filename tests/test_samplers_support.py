"""Shared helpers for the samplers tests: batch builders and an independent numpy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import SamplingBatch, SamplingParams, make_row
from samplers.pipeline import filtered_logits, sample

# The tests share one shape so that sample() and filtered_logits() compile once per run.
# Candidates 64, then 256 (WIDE), then the full sort of 500: every path runs in the tests.
SLOTS, VOCAB, CANDIDATES, WIDE, LOGPROBS, MAX_BIAS = 32, 500, 64, 256, 5, 4
STATIC = ("num_logprobs", "num_candidates", "wide_candidates")
SAMPLE = jax.jit(sample, static_argnames=STATIC)
FILTERED = jax.jit(filtered_logits, static_argnames=STATIC[1:])


def run_sample(logits, batch, allowed=None):
    return SAMPLE(
        logits,
        batch,
        num_logprobs=LOGPROBS,
        num_candidates=CANDIDATES,
        wide_candidates=WIDE,
        allowed=allowed,
    )


def run_filtered(logits, batch, allowed=None):
    return FILTERED(logits, batch, num_candidates=CANDIDATES, wide_candidates=WIDE, allowed=allowed)


def pad_logits(logits, slots: int = SLOTS, vocab: int = VOCAB) -> jnp.ndarray:
    """f32[n, v] -> f32[slots, vocab]: -inf for the extra tokens, copies of the last row."""
    logits = np.asarray(logits, np.float32)
    out = np.full((slots, vocab), -np.inf, np.float32)
    out[:, : logits.shape[1]] = logits[np.minimum(np.arange(slots), len(logits) - 1)]
    return jnp.asarray(out)


def batch_of(
    params: list[SamplingParams], vocab: int, prompts=None, slots: int | None = None
) -> SamplingBatch:
    """One active row per SamplingParams (prompt ids per row optional), then inactive rows
    up to `slots` (tests share a few shapes so that sample() compiles only a few times)."""
    prompts = prompts or [()] * len(params)
    rows = [make_row(p, vocab, MAX_BIAS, prompt) for p, prompt in zip(params, prompts, strict=True)]
    pad = (slots or len(rows)) - len(rows)
    if pad:
        rows.append(jax.tree.map(np.asarray, SamplingBatch.empty(pad, vocab, MAX_BIAS)))
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *rows)


def replicate(params: list[SamplingParams], vocab: int, n: int) -> SamplingBatch:
    """n rows of each SamplingParams, each row with its own seed (one draw per row)."""
    rows = [make_row(p, vocab, MAX_BIAS) for p in params]
    tiled = jax.tree.map(lambda *xs: np.repeat(np.concatenate(xs), n, axis=0), *rows)
    key = np.stack([np.zeros(len(params) * n), np.arange(len(params) * n)], 1)
    return jax.tree.map(jnp.asarray, dataclasses.replace(tiled, key=key.astype(np.uint32)))


def reference_probs(
    logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, mu=None
) -> np.ndarray:
    """The final sampling distribution by the textbook definitions, in float64 with sorts."""
    z = np.asarray(logits, np.float64) / temperature
    alive = np.isfinite(z)

    def probs():
        w = np.where(alive, np.exp(z - z[alive].max()), 0.0)
        return w / w.sum()

    if top_k:
        alive &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1:
        p = probs()
        order = np.lexsort((np.arange(len(z)), -p))  # descending, ties by lower id
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros_like(alive)
        kept[order] = before < top_p
        kept[order[0]] = True
        alive &= kept
    if min_p > 0:
        p = probs()
        alive &= p >= min_p * p.max()
    if typical_p < 1:
        p = probs()
        logp = np.log(np.where(alive, p, 1.0))
        entropy = -np.sum(np.where(alive, p * logp, 0.0))
        score = np.where(alive, np.abs(-logp - entropy), np.inf)
        order = np.argsort(score, kind="stable")
        last = min(np.sum(np.cumsum(p[order]) < typical_p), len(z) - 1)
        alive &= score <= score[order[last]]
    if mu is not None:
        p = probs()
        alive &= (-np.log2(np.where(alive, p, 1e-300)) <= mu) | (p == p.max())
    return probs()


@pytest.mark.parametrize(
    "kwargs, support",
    [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.7), {0, 1}),
        (dict(min_p=0.2, temperature=2.0), {0, 1, 2, 3}),
        (dict(top_p=0.8, temperature=0.5), {0}),
        (dict(typical_p=0.2), {1}),
        (dict(mu=2.0), {0}),
    ],
)
def test_reference_matches_worked_example(kwargs, support):
    p = reference_probs([2.0, 1.0, 0.0, -1.0], **kwargs)
    assert set(np.nonzero(p)[0].tolist()) == support
