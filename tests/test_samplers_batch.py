"""One compiled program for every mix of requests; seeds reproduce in any slot and batch."""

import jax
import jax.numpy as jnp
import numpy as np

from samplers import SamplingBatch, SamplingParams, clear_row, fork_row, make_row, write_row
from samplers.pipeline import sample
from tests.test_samplers_support import (
    CANDIDATES,
    LOGPROBS,
    MAX_BIAS,
    SAMPLE,
    SLOTS,
    VOCAB,
    WIDE,
    batch_of,
    run_sample,
)

SEEDED = SamplingParams(seed=7, temperature=0.9, top_p=0.95, min_p=0.02, presence_penalty=0.5)


def logits_sequence(steps, seed=0):
    """Per-step logits: rows 0-15 peaked, rows 16-31 nearly flat (their nuclei overflow the
    candidates, so batches holding them take the full-sort branch)."""
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(steps, SLOTS, VOCAB)).astype(np.float32)
    out[:, :16] *= 4.0
    out[:, 16:] *= 0.05
    return [jnp.asarray(x) for x in out]


def mixed_params(rng):
    kinds = [
        dict(),
        dict(temperature=0.0),
        dict(top_k=10, temperature=0.7),
        dict(top_p=0.99),
        dict(min_p=0.1, temperature=1.5),
        dict(typical_p=0.8),
        dict(mirostat_target=4.0),
        dict(repetition_penalty=1.3, frequency_penalty=0.4),
    ]
    return [SamplingParams(seed=int(rng.integers(1 << 30)), **kinds[i % 8]) for i in range(SLOTS)]


def run(batch, logits, row_of_interest):
    tokens = []
    for x in logits:
        t, _, batch = run_sample(x, batch)
        tokens.append(int(t[row_of_interest]))
    return tokens


def test_seeded_row_alone_and_in_any_slot_of_a_mixed_batch():
    steps = 5
    logits = logits_sequence(steps)
    rng = np.random.default_rng(1)
    for ref in (0, 20):  # a peaked row of logits, then a flat one
        alone = None
        for slot in (0, 13, 20, 31):
            seq = [x.at[slot].set(x[ref]) for x in logits]  # the row always sees the same logits
            empty = SamplingBatch.empty(SLOTS, VOCAB, MAX_BIAS)
            if alone is None:  # alone: every other slot is empty
                alone = run(write_row(empty, slot, make_row(SEEDED, VOCAB, MAX_BIAS)), seq, slot)
            params = mixed_params(rng)
            params[slot] = SEEDED
            assert run(batch_of(params, VOCAB), seq, slot) == alone, (ref, slot)
        assert len(set(alone)) > 1


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = logits_sequence(16, seed=2)
    runs = []
    for seed in (42, 42, 43):
        batch = batch_of([SamplingParams(seed=seed)] * SLOTS, VOCAB)
        runs.append([np.asarray(run_sample(x, batch)[0]) for x in logits])
        runs[-1] = np.stack(runs[-1])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).mean() > 0.5


def test_forked_choices_draw_independently_from_the_same_state():
    batch = write_row(
        SamplingBatch.empty(SLOTS, VOCAB, MAX_BIAS), 0, make_row(SEEDED, VOCAB, MAX_BIAS)
    )
    for dst in range(1, 4):
        batch = fork_row(batch, 0, dst, dst)
    logits = logits_sequence(8, seed=3)
    flat = [jnp.broadcast_to(x[20], x.shape) for x in logits]
    seqs = []
    for x in flat:
        t, _, batch = run_sample(x, batch)
        seqs.append(np.asarray(t[:4]))
    seqs = np.stack(seqs)
    assert len({tuple(seqs[:, i]) for i in range(4)}) == 4


def test_no_recompilation_when_rows_change():
    write, clear, fork = jax.jit(write_row), jax.jit(clear_row), jax.jit(fork_row)
    rng = np.random.default_rng(4)
    batch = batch_of(mixed_params(rng), VOCAB)
    logits = logits_sequence(1)[0]
    run_sample(logits, batch)
    sizes = SAMPLE._cache_size()
    variants = mixed_params(rng) + [
        SamplingParams(logit_bias={3: 5.0, 499: -100}, top_k=100, seed=1),
        SamplingParams(mirostat_target=1.0, mirostat_lr=0.0, typical_p=0.0, top_p=0.0),
        SamplingParams(temperature=2.0, repetition_penalty=2.0, presence_penalty=-2.0),
    ]
    for i, p in enumerate(variants):
        slot = jnp.int32(i % SLOTS)
        batch = write(batch, slot, make_row(p, VOCAB, MAX_BIAS, rng.integers(0, VOCAB, i + 1)))
        if i % 3 == 0:
            batch = clear(batch, jnp.int32((i * 7) % SLOTS))
        if i % 4 == 0:
            batch = fork(batch, slot, jnp.int32((i + 5) % SLOTS), jnp.int32(i % 5))
        _, _, batch = run_sample(logits, batch)
    assert SAMPLE._cache_size() == sizes
    assert write._cache_size() == clear._cache_size() == fork._cache_size() == 1


def test_raw_logprobs_for_the_rows_that_ask_and_nothing_else_changes():
    """logprob_rows: the rows marked get exactly the logprobs every row gets by default; the
    tokens and the state advance as they would; with no row marked the passes are skipped."""
    rng = np.random.default_rng(3)
    batch = batch_of(mixed_params(rng), VOCAB)
    logits = logits_sequence(1, seed=3)[0]
    call = jax.jit(sample, static_argnames=("num_logprobs", "num_candidates", "wide_candidates"))
    kw = dict(num_logprobs=LOGPROBS, num_candidates=CANDIDATES, wide_candidates=WIDE)
    tokens, info, after = call(logits, batch, **kw)
    asked = jnp.arange(SLOTS) % 3 == 0
    for rows in (asked, jnp.zeros(SLOTS, bool)):
        got_tokens, got, got_after = call(logits, batch, logprob_rows=rows, **kw)
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got.sampling_logprob, info.sampling_logprob)
        for a, b in zip(jax.tree.leaves(got_after), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(a, b)
        if rows.any():
            np.testing.assert_array_equal(got.token_logprob[rows], info.token_logprob[rows])
            np.testing.assert_array_equal(got.top_ids[rows], info.top_ids[rows])
            np.testing.assert_array_equal(got.top_logprobs[rows], info.top_logprobs[rows])
        else:
            assert not got.token_logprob.any() and not got.top_logprobs.any()
