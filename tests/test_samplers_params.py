"""SamplingParams validation (docs/sampling.md section 1) and the SamplingBatch row functions."""

import math

import jax
import numpy as np
import pytest

from samplers import (
    SamplingBatch,
    SamplingParams,
    SamplingParamsError,
    clear_row,
    fork_row,
    make_row,
    write_row,
)

BAD = [
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", "0.5"),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", None),
    ("top_p", 1.1),
    ("top_p", -0.01),
    ("top_p", math.nan),
    ("top_k", -1),
    ("top_k", 101),
    ("top_k", 1.5),
    ("top_k", 2.0),
    ("top_k", True),
    ("top_k", "3"),
    ("min_p", 1.01),
    ("min_p", -0.1),
    ("typical_p", 1.5),
    ("typical_p", -math.inf),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", math.nan),
    ("presence_penalty", -2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.5),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("mirostat_target", -1.0),
    ("mirostat_target", 0.0),
    ("mirostat_target", math.inf),
    ("mirostat_target", "5"),
    ("mirostat_lr", "fast"),
    ("mirostat_lr", -0.1),
    ("mirostat_lr", math.nan),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", False),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"1.5": 1}),
    ("logit_bias", {2.0: 1}),
    ("logit_bias", {True: 1}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {"10": 100.5}),
    ("logit_bias", {"10": math.nan}),
    ("logit_bias", {"10": "1"}),
    ("logit_bias", {"10": True}),
    ("logit_bias", [1, 2]),
    ("logit_bias", {"7": 1, 7: 2}),
    ("logit_bias", {"9" * 5000: 1}),  # more digits than int() converts
]


@pytest.mark.parametrize("field, value", BAD)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_message_states_the_range():
    with pytest.raises(SamplingParamsError, match="temperature must be between 0 and 2: 3.5"):
        SamplingParams(temperature=3.5)


GOOD = [
    dict(temperature=0.0),
    dict(temperature=2.0),
    dict(top_p=0.0),
    dict(top_k=0),
    dict(top_k=100),
    dict(min_p=1.0),
    dict(typical_p=0.0),
    dict(frequency_penalty=-2.0, presence_penalty=2.0),
    dict(repetition_penalty=2.0),
    dict(logit_bias={"10": -100}),
    dict(logit_bias={}),
    dict(mirostat_target=5.0, mirostat_lr=0.0),
    dict(seed=-(2**63)),
    dict(seed=2**64 - 1),
    dict(temperature=np.float32(0.5), top_k=np.int64(3)),
]


@pytest.mark.parametrize("kwargs", GOOD)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_values_are_normalised():
    p = SamplingParams(temperature=1, top_k=np.int64(3), logit_bias={"42": 1, 7: -2})
    assert isinstance(p.temperature, float) and type(p.top_k) is int
    assert p.logit_bias == {42: 1.0, 7: -2.0}


def test_make_row_fixed_shapes_and_seed_key():
    row = make_row(SamplingParams(seed=42, logit_bias={3: 5.0}), 16, 4, [1, 1, 5], choice_index=2)
    assert row.counts.shape == (1, 16) and row.bias_ids.shape == (1, 4)
    assert np.nonzero(row.prompt_mask[0])[0].tolist() == [1, 5]
    assert row.bias_ids[0].tolist() == [3, 0, 0, 0] and row.bias_values[0].tolist()[:2] == [5, 0]
    np.testing.assert_array_equal(row.key[0], jax.random.key_data(jax.random.PRNGKey(42)))
    assert row.choice[0] == 2
    unseeded = [make_row(SamplingParams(), 16, 4).key[0].tolist() for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_mirostat_mu_starts_at_twice_target():
    row = make_row(SamplingParams(mirostat_target=3.0), 8, 1)
    assert row.mirostat_on[0] and row.mirostat_mu[0] == 6.0
    assert not make_row(SamplingParams(), 8, 1).mirostat_on[0]


def test_write_fork_clear():
    batch = SamplingBatch.empty(4, 16, 2)
    assert not batch.active.any() and batch.counts.shape == (4, 16)
    row = make_row(SamplingParams(seed=7, temperature=0.3, top_k=5), 16, 2, [2])
    batch = write_row(batch, 1, row)
    batch = batch.__class__(**{**batch.__dict__, "counts": batch.counts.at[1, 9].set(2)})
    batch = fork_row(batch, 1, 3, 1)
    assert batch.active.tolist() == [False, True, False, True]
    assert batch.top_k[3] == 5 and bool(batch.prompt_mask[3, 2]) and batch.counts[3, 9] == 2
    assert batch.key[3].tolist() == batch.key[1].tolist() and batch.choice.tolist() == [0, 0, 0, 1]
    batch = clear_row(batch, 1)
    assert not batch.active[1] and batch.top_k[1] == 0 and batch.counts[1].sum() == 0
    assert batch.temperature.dtype == np.float32 and batch.top_k.dtype == np.int32
