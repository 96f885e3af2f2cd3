"""sample(branchless=True) (the GPU form: no conditional) gives exactly what the lax.cond form
gives: tokens, logprobs, top logprobs and the advanced state, bit for bit, over random batches
that take every side of every conditional (samplers.branching)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from samplers import SamplingParams, filters, mask
from samplers.params import GREEDY_TEMPERATURE
from samplers.pipeline import candidates, processed_logits, sample, truncate
from tests.test_samplers_mask import pack
from tests.test_samplers_support import (
    CANDIDATES,
    LOGPROBS,
    MAX_BIAS,
    SLOTS,
    STATIC,
    VOCAB,
    WIDE,
    batch_of,
)

FORMS = {
    b: jax.jit(functools.partial(sample, branchless=b), static_argnames=STATIC)
    for b in (False, True)
}
RNG = np.random.default_rng(17)


def random_params(rng, *, greedy, penalties, typical, mirostat) -> SamplingParams:
    """One row; each truncation control on in about half the rows, the rest as asked."""
    on = rng.random(5) < 0.5
    bias = {int(t): float(rng.uniform(-5, 5)) for t in rng.choice(VOCAB, MAX_BIAS, False)}
    return SamplingParams(
        temperature=0.0 if rng.random() < greedy else float(rng.choice([0.5, 1.0, 1.6])),
        top_k=int(rng.choice([1, 20, 80])) if on[0] else 0,
        top_p=float(rng.choice([0.5, 0.9, 0.99])) if on[1] else 1.0,
        min_p=float(rng.choice([0.001, 0.05])) if on[2] else 0.0,
        typical_p=float(rng.choice([0.3, 0.9])) if typical and on[3] else 1.0,
        repetition_penalty=float(rng.uniform(0.7, 1.5)) if rng.random() < penalties else 1.0,
        frequency_penalty=float(rng.uniform(-1, 1)) if rng.random() < penalties else 0.0,
        presence_penalty=float(rng.uniform(-1, 1)) if rng.random() < penalties else 0.0,
        logit_bias=bias if on[4] else None,
        mirostat_target=float(rng.uniform(1, 6)) if rng.random() < mirostat else None,
        seed=int(rng.integers(1 << 62)),
    )


def random_case(rng, profile: str):
    """(logits, batch, allowed, logprob_rows). 'cheap': every conditional takes its shortcut;
    'costly': none does; 'mixed': anything. Row scales run from flat (nuclei past the wide
    candidates: the full sort) to peaked."""
    cheap, costly = profile == "cheap", profile == "costly"
    active = SLOTS if costly else int(rng.integers(1, SLOTS + 1))
    params = [
        random_params(
            rng,
            greedy=1.0 if cheap else 0.0 if costly else float(rng.choice([0.0, 0.3, 1.0])),
            penalties=0.0 if cheap else 0.5 if costly else float(rng.choice([0.0, 0.3])),
            typical=not cheap and (costly or rng.random() < 0.5),
            mirostat=0.0 if cheap else 0.2,
        )
        for _ in range(active)
    ]
    prompts = [rng.integers(0, VOCAB, int(rng.integers(0, 20))) for _ in params]
    batch = batch_of(params, VOCAB, prompts, slots=SLOTS)
    scale = rng.choice([0.02, 0.3, 1.0, 4.0], size=(SLOTS, 1))
    if costly:
        scale[:4] = 0.02  # flat rows reach the full sort and draw tail tokens
    logits = (rng.normal(size=(SLOTS, VOCAB)) * scale).astype(np.float32)
    allowed = np.ones((SLOTS, VOCAB), bool)
    if not cheap and (costly or rng.random() < 0.5):
        rows = rng.random(SLOTS) < 0.3
        allowed[rows] = rng.random((int(rows.sum()), VOCAB)) < 0.5
        allowed[:, 0] = True  # every row keeps a token
    wanted = rng.random(SLOTS) < (0.0 if cheap else 1.0 if costly else 0.5)
    return jnp.asarray(logits), batch, jnp.asarray(pack(allowed)), jnp.asarray(wanted)


def run(form: bool, logits, batch, allowed, wanted):
    return FORMS[form](
        logits,
        batch,
        num_logprobs=LOGPROBS,
        num_candidates=CANDIDATES,
        wide_candidates=WIDE,
        logprob_rows=wanted,
        allowed=allowed,
    )


@jax.jit
def _sides(logits, batch, allowed, wanted):
    sampling = batch.active & (batch.temperature >= GREEDY_TEMPERATURE)
    x = processed_logits(logits, batch, allowed)
    z = filters.temperature(x, batch.temperature)
    fast = truncate(candidates(x, z, batch.temperature, CANDIDATES)[0], batch).fail & sampling
    wide = truncate(candidates(x, z, batch.temperature, WIDE)[0], batch).fail & sampling
    neutral = (
        (batch.repetition_penalty == 1)
        & (batch.frequency_penalty == 0)
        & (batch.presence_penalty == 0)
    )
    flags = dict(
        penalties=~jnp.all(neutral),
        grammar=jnp.any(mask.constrained(allowed)),
        typical=jnp.any(batch.typical_p < 1),
        draw=jnp.any(sampling),
        wide=jnp.any(fast),
        full_sort=jnp.any(fast) & jnp.any(wide),
        logprobs=jnp.any(batch.active & wanted),
    )
    return flags, x, sampling


def sides(logits, batch, allowed, wanted, tokens) -> dict[str, bool]:
    """Which side each conditional of sample() takes (True: the costly one), recomputed from
    the pipeline's public pieces. A drawn token ranked past the candidates came from the tail."""
    flags, x, sampling = _sides(logits, batch, allowed, wanted)
    order = np.argsort(-np.asarray(x), axis=-1, kind="stable")
    rank = np.argmax(order == np.asarray(tokens)[:, None], axis=-1)
    tail = np.any(np.asarray(sampling) & (rank >= CANDIDATES))
    return {name: bool(flag) for name, flag in flags.items()} | {"tail_token": bool(tail)}


def assert_same(a, b, what: str) -> None:
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_branchless_form_is_the_cond_form_bit_for_bit():
    seen: dict[str, set[bool]] = {}
    profiles = ["cheap", "costly"] * 2 + ["mixed"] * 12
    for case, profile in enumerate(profiles):
        logits, batch, allowed, wanted = random_case(RNG, profile)
        states = {False: batch, True: batch}
        for step in range(3):  # counts, step and mirostat mu carry into the next draw
            outs = {b: run(b, logits, states[b], allowed, wanted) for b in FORMS}
            assert_same(outs[True], outs[False], f"case {case} ({profile}) step {step}: ")
            taken = sides(logits, states[False], allowed, wanted, outs[False][0])
            for name, side in taken.items():
                seen.setdefault(name, set()).add(side)
            if profile != "mixed" and step == 0:
                assert set(taken.values()) == {profile == "costly"}, (profile, taken)
            states = {b: outs[b][2] for b in FORMS}
            logits = jnp.roll(logits, 7, axis=1)
    assert all(s == {False, True} for s in seen.values()), seen


def test_branchless_form_has_no_conditional():
    logits, batch, allowed, wanted = random_case(RNG, "mixed")
    args = dict(num_logprobs=LOGPROBS, num_candidates=CANDIDATES, wide_candidates=WIDE)
    text = {
        b: FORMS[b].lower(logits, batch, logprob_rows=wanted, allowed=allowed, **args).as_text()
        for b in FORMS
    }
    assert "stablehlo.case" not in text[True] and "stablehlo.if" not in text[True]
    assert "stablehlo.case" in text[False] or "stablehlo.if" in text[False]
