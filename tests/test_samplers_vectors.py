"""Worked vectors of docs/sampling.md 2.2 and 3.2, and the pinned order / logprob semantics.

The 4-token mock logits are padded with -inf to the shared test vocabulary.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import SamplingParams
from tests.test_samplers_support import (
    SLOTS,
    VOCAB,
    batch_of,
    pad_logits,
    run_filtered,
    run_sample,
)

L = [2.0, 1.0, 0.0, -1.0]


def step(params, logits=None, prompts=None, counts=None, batch=None):
    """One sample() over the rows for `params` (padded to SLOTS); logits default to L."""
    if batch is None:
        batch = batch_of(params, VOCAB, prompts, slots=SLOTS)
    if counts is not None:
        batch = dataclasses.replace(batch, counts=batch.counts.at[: len(counts), :4].set(counts))
    logits = pad_logits(np.tile(L, (len(params), 1)) if logits is None else logits)
    tokens, info, new = run_sample(logits, batch)
    n = len(params)
    return tokens[:n], jax.tree.map(lambda x: x[:n], info), new


def final_logits(params, logits=None, prompts=None, counts=None):
    """The final logits of each row, cut back to the logits' own width."""
    logits = np.tile(L, (len(params), 1)) if logits is None else np.asarray(logits)
    batch = batch_of(params, VOCAB, prompts, slots=SLOTS)
    if counts is not None:
        batch = dataclasses.replace(batch, counts=batch.counts.at[: len(counts), :4].set(counts))
    out = run_filtered(pad_logits(logits), batch)
    return np.asarray(out[: len(params), : logits.shape[1]])


SETS = [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.7), {0, 1}),
    (dict(top_p=0.0), {0}),
    (dict(min_p=0.2), {0, 1}),
    (dict(min_p=0.2, temperature=2.0), {0, 1, 2, 3}),
    (dict(top_p=0.8, temperature=0.5), {0}),
    (dict(typical_p=0.5), {0, 1}),
    (dict(typical_p=0.2), {1}),
    (dict(top_k=0), {0, 1, 2, 3}),
    (dict(mirostat_target=1.0), {0}),  # mu0 = 2 bits keeps only token 0 (surprise 0.635)
]


def support(logits_rows):
    return [set(np.nonzero(np.isfinite(row))[0].tolist()) for row in logits_rows]


def test_worked_example_sets():
    got = support(final_logits([SamplingParams(**kw) for kw, _ in SETS]))
    assert got == [want for _, want in SETS]


def test_worked_example_sets_with_a_tail():
    """The same vectors with 496 more tokens at -30, most of them outside the candidates."""
    logits = np.full((len(SETS), VOCAB), -30.0, np.float32)
    logits[:, :4] = L
    params = [SamplingParams(**kw) for kw, _ in SETS]
    got = support(final_logits(params, logits))
    assert got[:-2] == [want for _, want in SETS[:-2]]
    assert got[-2] == set(range(VOCAB)) and got[-1] == {0}


def test_penalty_and_bias_vectors():
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(logit_bias={"3": 5}, temperature=0.5),
    ]
    counts = np.zeros((3, 4), np.int32)
    counts[0, 3] = 1  # row 0 has seen {0 (prompt), 3 (generated)}
    counts[1, 1] = 3
    out = final_logits(params, prompts=[[0], [], []], counts=counts)
    np.testing.assert_allclose(out[0], [2 / 1.5, 1, 0, -1.5], rtol=1e-6)
    np.testing.assert_allclose(out[1], [2, 1 - 1.5 - 0.3, 0, -1], rtol=1e-6)
    np.testing.assert_allclose(out[2], [4, 2, 0, 8], rtol=1e-6)


def test_repetition_counts_prompt_frequency_does_not():
    """Test 49."""
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=2.0)]
    out = final_logits(params, prompts=[[0], [0]])
    np.testing.assert_allclose(out[0], [2 / 1.5, 1, 0, -1], rtol=1e-6)
    np.testing.assert_allclose(out[1], L)


def test_order_pin_penalty_then_bias():
    """Test 47: repetition penalty before logit_bias, so the first token is 1 (not 0)."""
    params = [SamplingParams(repetition_penalty=2.0, logit_bias={"0": -3}, temperature=0.0)]
    tokens, info, _ = step(params, [[3.0, -1.0, -5.0, -5.0]], prompts=[[0]])
    assert tokens.tolist() == [1]
    assert info.sampling_logprob.tolist() == [0.0]


def test_presence_penalty_sampling_logprob():
    """Test 48: after token 1 was generated, draws come from softmax([2, -1, 0, -1])."""
    params = [SamplingParams(presence_penalty=2.0, seed=s) for s in range(SLOTS)]
    counts = np.zeros((SLOTS, 4), np.int32)
    counts[:, 1] = 1
    tokens, info, _ = step(params, counts=counts)
    penalised = jax.nn.log_softmax(jnp.asarray([2.0, -1.0, 0.0, -1.0]))
    raw = jax.nn.log_softmax(jnp.asarray(L))
    np.testing.assert_allclose(info.sampling_logprob, penalised[tokens], atol=1e-5)
    np.testing.assert_allclose(info.token_logprob, raw[tokens], atol=1e-5)
    assert len(set(tokens.tolist())) > 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-9), dict(top_p=0.0), dict(temperature=0.0)],
)
def test_greedy_equivalents(kwargs):
    """Tests 5, 35, 38, 39: these settings give the argmax token for any seed."""
    logits = np.random.default_rng(0).normal(size=(SLOTS, 4)).astype(np.float32)
    tokens, _, _ = step([SamplingParams(seed=s, **kwargs) for s in range(SLOTS)], logits)
    assert tokens.tolist() == np.argmax(logits, -1).tolist()


def test_greedy_logprobs():
    """Test 54: greedy gives sampling_logprob 0 and the raw logprob is the top alternative."""
    tokens, info, _ = step([SamplingParams(temperature=0.0)] * 3)
    assert tokens.tolist() == [0, 0, 0]
    assert info.sampling_logprob.tolist() == [0.0] * 3
    np.testing.assert_allclose(info.token_logprob, info.top_logprobs[:, 0])
    top = info.top_logprobs[0, :4]
    np.testing.assert_allclose(top, jax.nn.log_softmax(jnp.asarray(L)), rtol=1e-6)
    assert info.top_logprobs[0, 4] == -np.inf  # the padding tokens have probability 0


def test_top_logprobs_are_raw_and_ties_go_to_lower_ids():
    logits = [[1.0, 5.0, 1.0, 5.0]]
    tokens, info, _ = step([SamplingParams(temperature=0.5, logit_bias={0: 100})], logits)
    assert tokens.tolist() == [0]  # the bias forces token 0 ...
    assert info.top_ids[0, :4].tolist() == [1, 3, 0, 2]  # ... but the alternatives are raw
    raw = jax.nn.log_softmax(jnp.asarray(logits[0]))
    np.testing.assert_allclose(info.token_logprob, raw[:1], rtol=1e-6)
    np.testing.assert_allclose(info.sampling_logprob, [0.0], atol=1e-6)


def test_temperature_changes_sampling_logprob_not_logprob():
    """Test 55; with T=1 and no filters the two are equal."""
    tokens, info, _ = step([SamplingParams(temperature=0.5, seed=3), SamplingParams(seed=3)])
    raw = jax.nn.log_softmax(jnp.asarray(L))
    np.testing.assert_allclose(info.token_logprob, raw[tokens], rtol=1e-6)
    np.testing.assert_allclose(info.sampling_logprob[1], info.token_logprob[1], rtol=1e-5)
    scaled = jax.nn.log_softmax(jnp.asarray(L) / 0.5)[tokens[0]]
    np.testing.assert_allclose(info.sampling_logprob[0], scaled, rtol=1e-5)


def test_mirostat_worked_vector():
    """docs/sampling.md 3.2: mu0 = 2, mu1 = 2.1, mu2 = 2.1548 (token 0) or 2.0105 (token 1)."""
    params = [SamplingParams(mirostat_target=1.0, mirostat_lr=0.1, seed=s) for s in range(SLOTS)]
    batch = batch_of(params, VOCAB, slots=SLOTS)
    np.testing.assert_allclose(batch.mirostat_mu, 2.0)
    tokens, info, batch = step(params, batch=batch)
    assert set(tokens.tolist()) == {0}
    np.testing.assert_allclose(info.sampling_logprob, 0.0, atol=1e-6)
    np.testing.assert_allclose(batch.mirostat_mu, 2.1, rtol=1e-6)
    tokens, info, batch = step(params, batch=batch)
    tokens, mu = np.asarray(tokens), np.asarray(batch.mirostat_mu)
    assert set(tokens.tolist()) == {0, 1}
    np.testing.assert_allclose(mu[tokens == 0], 2.1548, atol=1e-4)
    np.testing.assert_allclose(mu[tokens == 1], 2.0105, atol=1e-4)
    q = np.exp(np.asarray(info.sampling_logprob))
    np.testing.assert_allclose(q, np.where(tokens == 0, 0.7311, 0.2689), atol=1e-4)


def test_mirostat_with_top_k_1_is_greedy():
    """Test 71: the filters run before mirostat, so top_k=1 gives the greedy tokens."""
    rng = np.random.default_rng(1)
    params = [SamplingParams(mirostat_target=3.0, top_k=1, seed=s) for s in range(8)]
    batch = batch_of(params, VOCAB, slots=SLOTS)
    for _ in range(4):
        logits = rng.normal(size=(8, 4)).astype(np.float32)
        tokens, _, batch = step(params, logits, batch=batch)
        assert tokens.tolist() == np.argmax(logits, -1).tolist()


def test_state_update_only_in_active_rows():
    batch = batch_of([SamplingParams(seed=1, mirostat_target=2.0)] * 2, VOCAB, slots=SLOTS)
    batch = dataclasses.replace(batch, active=batch.active.at[1].set(False))
    tokens, _, new = step([None, None], batch=batch)
    assert new.counts[0, tokens[0]] == 1 and new.counts[1].sum() == 0
    assert new.step[:2].tolist() == [1, 0]
    assert new.mirostat_mu[0] != batch.mirostat_mu[0]
    assert new.mirostat_mu[1] == batch.mirostat_mu[1]
