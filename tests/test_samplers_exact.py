"""Exactness: every filter and penalty against HF transformers' processors, the OpenAI
frequency/presence formula, and the candidate path against the full sort."""

import jax
import jax.numpy as jnp
import numpy as np

from samplers import SamplingParams
from samplers.pipeline import candidates, full_sort_candidates, truncate
from tests.test_samplers_support import (
    SLOTS,
    VOCAB,
    batch_of,
    reference_probs,
    run_filtered,
    run_sample,
)

ROWS = SLOTS


def mixed_rows(rng, n, penalties=True):
    """Random parameters, each control on in about half the rows."""
    out = []
    for s in range(n):
        on = rng.random(6) < 0.5
        out.append(
            SamplingParams(
                temperature=float(rng.choice([0.5, 0.8, 1.0, 1.7])) if on[0] else 1.0,
                top_k=int(rng.choice([1, 5, 40])) if on[1] else 0,
                top_p=float(rng.choice([0.0, 0.3, 0.9, 0.99])) if on[2] else 1.0,
                min_p=float(rng.choice([0.01, 0.05, 0.3])) if on[3] else 0.0,
                typical_p=float(rng.choice([0.2, 0.6, 0.95])) if on[4] else 1.0,
                repetition_penalty=float(rng.uniform(0.5, 2.0)) if penalties and on[5] else 1.0,
                seed=s,
            )
        )
    return out


def hf_final_logits(logits, params, input_ids):
    import torch
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    rows = []
    for row, p, ids in zip(logits, params, input_ids, strict=True):
        scores = torch.tensor(row[None], dtype=torch.float32)
        ids = torch.tensor([ids], dtype=torch.long)
        chain = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty)]
        chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            chain.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            chain.append(MinPLogitsWarper(p.min_p))
        if p.typical_p < 1:
            chain.append(TypicalLogitsWarper(p.typical_p))
        for proc in chain:
            scores = proc(ids, scores)
        rows.append(scores[0].numpy())
    return np.stack(rows)


def test_filters_and_repetition_match_hf():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(ROWS, VOCAB)) * 3).astype(np.float32)
    params = mixed_rows(rng, ROWS)
    prompts = [rng.integers(0, VOCAB, size=20).tolist() for _ in range(ROWS)]
    generated = [rng.integers(0, VOCAB, size=5).tolist() for _ in range(ROWS)]
    batch = batch_of(params, VOCAB, prompts)
    counts = np.zeros((ROWS, VOCAB), np.int32)
    for r, ids in enumerate(generated):
        np.add.at(counts[r], ids, 1)
    batch = batch.__class__(**{**batch.__dict__, "counts": jnp.asarray(counts)})

    want = hf_final_logits(logits, params, [p + g for p, g in zip(prompts, generated, strict=True)])
    got = np.asarray(run_filtered(jnp.asarray(logits), batch))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)
    assert np.isfinite(want).sum(1).min() == 1 and np.isfinite(want).sum(1).max() > 100


def test_frequency_presence_match_openai_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(ROWS, VOCAB)).astype(np.float32)
    freq, pres = rng.uniform(-2, 2, ROWS), rng.uniform(-2, 2, ROWS)
    params = [
        SamplingParams(frequency_penalty=float(f), presence_penalty=float(p))
        for f, p in zip(freq, pres, strict=True)
    ]
    counts = rng.integers(0, 4, size=(ROWS, VOCAB)) * (rng.random((ROWS, VOCAB)) < 0.05)
    batch = batch_of(params, VOCAB, [rng.integers(0, VOCAB, 30).tolist()] * ROWS)
    batch = batch.__class__(**{**batch.__dict__, "counts": jnp.asarray(counts, jnp.int32)})
    got = np.asarray(run_filtered(jnp.asarray(logits), batch))
    # OpenAI: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    want = logits - counts * freq[:, None] - (counts > 0) * pres[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_candidate_path_agrees_with_full_sort_whenever_it_claims_to():
    """Rows the candidate path does not flag must have exactly the full-sort surviving set."""
    rng = np.random.default_rng(2)
    n = 128
    x = jnp.asarray((rng.normal(size=(n, VOCAB)) * rng.uniform(0.5, 6, (n, 1))).astype(np.float32))
    params = mixed_rows(rng, n, penalties=False)
    for i in range(0, n, 8):  # include mirostat rows
        params[i] = SamplingParams(mirostat_target=float(rng.uniform(1, 8)), seed=i)
    batch = batch_of(params, VOCAB)

    @jax.jit
    def both(x, batch):
        z = x / jnp.where(batch.temperature < 1e-5, 1.0, batch.temperature)[:, None]
        cand, ids = candidates(x, z, batch.temperature, 32)
        fast = truncate(cand, batch)
        full_cand, full_ids = full_sort_candidates(x, batch.temperature)
        full = truncate(full_cand, batch)
        return fast.keep, fast.tail_on, fast.fail, ids, full.keep, full_ids

    keep, tail_on, fail, ids, full_keep, full_ids = map(np.asarray, both(x, batch))
    assert 0.3 * n < (~fail).sum() < n  # both paths are exercised
    for r in np.nonzero(~fail)[0]:
        want = set(full_ids[r][full_keep[r]].tolist())
        got = set(ids[r][keep[r]].tolist())
        if tail_on[r]:
            got |= set(range(VOCAB)) - set(ids[r].tolist())
        assert got == want, r


def test_full_sort_fallback_when_the_nucleus_exceeds_the_candidates():
    """Nearly flat logits: top_p=0.99 keeps ~490 of 500 tokens, far beyond the 64 candidates."""
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=0.05, size=(ROWS, VOCAB)).astype(np.float32)
    params = [SamplingParams(top_p=0.99), SamplingParams(top_p=0.9, min_p=0.9, temperature=1.5)]
    params += [SamplingParams(temperature=0.0)] * (ROWS - 2)
    got = np.asarray(run_filtered(jnp.asarray(logits), batch_of(params, VOCAB)))
    for row, p, lg in zip(got[:2], params, logits, strict=False):
        want = reference_probs(lg, p.temperature, top_p=p.top_p, min_p=p.min_p) > 0
        assert np.isfinite(row).sum() > 64
        np.testing.assert_array_equal(np.isfinite(row), want)


def test_wide_candidates_when_the_nucleus_exceeds_the_first_candidates():
    """Nearly flat logits, top_p=0.3: ~150 of 500 tokens survive, beyond the 64 candidates
    and within the 256 wide ones (the middle step, no full sort); draws stay inside."""
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=0.05, size=(ROWS, VOCAB)).astype(np.float32)
    params = [SamplingParams(top_p=0.3, seed=1), SamplingParams(top_p=0.4, min_p=0.5, seed=2)]
    params += [SamplingParams(temperature=0.0)] * (ROWS - 2)
    batch = batch_of(params, VOCAB)
    got = np.asarray(run_filtered(jnp.asarray(logits), batch))
    for row, p, lg in zip(got[:2], params, logits, strict=False):
        want = reference_probs(lg, p.temperature, top_p=p.top_p, min_p=p.min_p) > 0
        assert 64 < want.sum() < 256
        np.testing.assert_array_equal(np.isfinite(row), want)
    tokens, _, _ = run_sample(jnp.asarray(logits), batch)
    for r in range(2):
        assert np.isfinite(got[r, int(tokens[r])])


def test_unrolled_threefry_equals_jax_random_hash():
    import jax.extend

    from samplers.threefry import threefry_2x32

    rng = np.random.default_rng(3)
    k0, k1 = (jnp.asarray(rng.integers(0, 2**32, (5, 1), dtype=np.uint32)) for _ in range(2))
    x0, x1 = (jnp.asarray(rng.integers(0, 2**32, (5, 7), dtype=np.uint32)) for _ in range(2))
    got = jax.jit(threefry_2x32)((k0, k1), (x0, x1))
    for row in range(5):
        want = jax.extend.random.threefry_2x32(
            (k0[row, 0], k1[row, 0]), jnp.concatenate([x0[row], x1[row]])
        )
        np.testing.assert_array_equal(np.concatenate([got[0][row], got[1][row]]), want)
