"""Sampling parameters: one request (SamplingParams) and one row per slot (SamplingBatch).

`SamplingParams` checks the ranges of docs/sampling.md section 1 once, when it is built; a bad
value raises `SamplingParamsError` naming the field. What depends on an engine (logit_bias ids
against its vocabulary, how many bias entries its table holds) is the engine's admission check.

`SamplingBatch` holds every parameter as a device array with one row per slot. A disabled
control holds its neutral value (top_k 0, top_p 1, min_p 0, typical_p 1, penalties 0/0/1,
zero bias, mirostat off), so one compiled program serves every mix of requests and writing new
values never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GREEDY_TEMPERATURE = 1e-5  # T below this is greedy (vLLM's epsilon)
MAX_TOP_K = 100
MAX_BIAS = 100.0
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _number(field: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite real in [lo, hi] (or (lo, hi]); NaN and inf fail the range test."""
    if not _is_number(value):
        raise SamplingParamsError(field, f"{field} must be a number: {_fmt(value)}")
    x = float(value)
    above_lo = x > lo if lo_open else x >= lo
    if not (above_lo and x <= hi):
        rule = (
            f"greater than {lo:g} and at most {hi:g}" if lo_open else f"between {lo:g} and {hi:g}"
        )
        raise SamplingParamsError(field, f"{field} must be {rule}: {_fmt(value)}")
    return x


def _integer(field: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise SamplingParamsError(field, f"{field} must be an integer: {_fmt(value)}")
    if not lo <= int(value) <= hi:
        raise SamplingParamsError(field, f"{field} must be between {lo} and {hi}: {value}")
    return int(value)


def _positive(field: str, value: Any, allow_zero: bool) -> float:
    """A finite real > 0 (or >= 0)."""
    if not _is_number(value):
        raise SamplingParamsError(field, f"{field} must be a number: {_fmt(value)}")
    x = float(value)
    if not (math.isfinite(x) and (x >= 0 if allow_zero else x > 0)):
        rule = "at least 0" if allow_zero else "greater than 0"
        raise SamplingParamsError(field, f"{field} must be a finite number {rule}: {_fmt(value)}")
    return x


def _bias_id(key: Any) -> int:
    """A token id: an int, or a base-10 integer string (JSON object keys are strings)."""
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("+-").isdigit():
        try:
            return int(key)
        except ValueError:  # more digits than Python converts
            pass
    raise SamplingParamsError("logit_bias", f"logit_bias keys must be integer token ids: {key!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling controls, validated on construction (docs/sampling.md section 1).

    Values are normalised: numbers become Python floats / ints and logit_bias becomes
    {int token id >= 0: float} (string keys such as "42" are accepted, as JSON sends them).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    mirostat_target: float | None = None
    mirostat_lr: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        fields = {
            "temperature": _number("temperature", self.temperature, 0, 2),
            "top_k": _integer("top_k", self.top_k, 0, MAX_TOP_K),
            "top_p": _number("top_p", self.top_p, 0, 1),
            "min_p": _number("min_p", self.min_p, 0, 1),
            "typical_p": _number("typical_p", self.typical_p, 0, 1),
            "frequency_penalty": _number("frequency_penalty", self.frequency_penalty, -2, 2),
            "presence_penalty": _number("presence_penalty", self.presence_penalty, -2, 2),
            "repetition_penalty": _number(
                "repetition_penalty", self.repetition_penalty, 0, 2, lo_open=True
            ),
            "mirostat_lr": _positive("mirostat_lr", self.mirostat_lr, allow_zero=True),
        }
        if self.mirostat_target is not None:
            fields["mirostat_target"] = _positive(
                "mirostat_target", self.mirostat_target, allow_zero=False
            )
        if self.seed is not None:
            fields["seed"] = _integer("seed", self.seed, _SEED_MIN, _SEED_MAX)
        if self.logit_bias is not None:
            fields["logit_bias"] = _validate_bias(self.logit_bias)
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def _validate_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise SamplingParamsError("logit_bias", f"logit_bias must be an object: {_fmt(bias)}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = _bias_id(key)
        if token < 0:
            raise SamplingParamsError(
                "logit_bias", f"logit_bias token ids must be at least 0: {key!r}"
            )
        if token in out:
            raise SamplingParamsError("logit_bias", f"logit_bias repeats token id {token}")
        out[token] = _number("logit_bias", value, -MAX_BIAS, MAX_BIAS)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-slot sampling state as device arrays. S = slots, V = vocab, B = max bias entries.

    A disabled control holds its neutral value; `active` marks slots holding a request.
    Randomness for slot s is keyed by (key[s]; choice[s], step[s], token id) only, so a seeded
    request draws the same tokens in any slot and beside any other requests.
    """

    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S]; 0 = off
    top_p: jax.Array  # f32[S]; 1 = off
    min_p: jax.Array  # f32[S]; 0 = off
    typical_p: jax.Array  # f32[S]; 1 = off
    frequency_penalty: jax.Array  # f32[S]
    presence_penalty: jax.Array  # f32[S]
    repetition_penalty: jax.Array  # f32[S]; 1 = off
    bias_ids: jax.Array  # i32[S, B]; padding entries are (0, 0.0)
    bias_values: jax.Array  # f32[S, B]
    mirostat_on: jax.Array  # bool[S]
    mirostat_target: jax.Array  # f32[S]; tau, in bits
    mirostat_lr: jax.Array  # f32[S]; eta
    mirostat_mu: jax.Array  # f32[S]; starts at 2 * tau
    key: jax.Array  # u32[S, 2]; raw threefry key of the request
    choice: jax.Array  # i32[S]; choice index within the request (n > 1)
    step: jax.Array  # i32[S]; tokens drawn so far
    counts: jax.Array  # i32[S, V]; generated-token counts (frequency / presence)
    prompt_mask: jax.Array  # bool[S, V]; token occurs in the prompt (repetition)
    active: jax.Array  # bool[S]

    @property
    def slots(self) -> int:
        return self.counts.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.counts.shape[1]

    @property
    def max_bias(self) -> int:
        return self.bias_ids.shape[1]

    @staticmethod
    def empty(slots: int, vocab_size: int, max_bias: int) -> SamplingBatch:
        """All slots inactive, every control neutral."""
        row = make_row(SamplingParams(seed=0), vocab_size, max_bias)
        empty = dataclasses.replace(row, active=np.zeros((1,), bool))
        return jax.tree.map(lambda x: jnp.asarray(np.repeat(x, slots, axis=0)), empty)


def make_row(
    params: SamplingParams,
    vocab_size: int,
    max_bias: int,
    prompt_ids: Sequence[int] | np.ndarray = (),
    choice_index: int = 0,
) -> SamplingBatch:
    """Host side: one request as a one-slot SamplingBatch of numpy arrays, ready for write_row.

    No seed => fresh entropy from the OS. The request must already fit the shapes (at most
    `max_bias` bias entries, token ids below `vocab_size`): the engine admits only such.
    """
    bias = params.logit_bias or {}
    bias_ids = np.zeros((1, max_bias), np.int32)
    bias_values = np.zeros((1, max_bias), np.float32)
    bias_ids[0, : len(bias)] = list(bias.keys())
    bias_values[0, : len(bias)] = list(bias.values())

    prompt = np.asarray(prompt_ids, np.int64).reshape(-1)
    prompt_mask = np.zeros((1, vocab_size), bool)
    prompt_mask[0, prompt] = True

    # Threefry key of a 64-bit seed, as jax.random.PRNGKey builds it: [high word, low word].
    seed = (params.seed if params.seed is not None else secrets.randbits(64)) % 2**64
    key = np.array([[seed >> 32, seed & 0xFFFFFFFF]], np.uint32)

    on = params.mirostat_target is not None
    tau = params.mirostat_target if on else 0.0

    def f32(x: float) -> np.ndarray:
        return np.array([x], np.float32)

    return SamplingBatch(
        temperature=f32(params.temperature),
        top_k=np.array([params.top_k], np.int32),
        top_p=f32(params.top_p),
        min_p=f32(params.min_p),
        typical_p=f32(params.typical_p),
        frequency_penalty=f32(params.frequency_penalty),
        presence_penalty=f32(params.presence_penalty),
        repetition_penalty=f32(params.repetition_penalty),
        bias_ids=bias_ids,
        bias_values=bias_values,
        mirostat_on=np.array([on]),
        mirostat_target=f32(tau),
        mirostat_lr=f32(params.mirostat_lr if on else 0.0),
        mirostat_mu=f32(2.0 * tau),
        key=key,
        choice=np.array([choice_index], np.int32),
        step=np.zeros((1,), np.int32),
        counts=np.zeros((1, vocab_size), np.int32),
        prompt_mask=prompt_mask,
        active=np.ones((1,), bool),
    )


def write_row(batch: SamplingBatch, slot: jax.Array | int, row: SamplingBatch) -> SamplingBatch:
    """Put a one-slot batch (from make_row) into `slot`. Jittable; `slot` may be traced."""
    return jax.tree.map(lambda b, r: b.at[slot].set(jnp.asarray(r)[0]), batch, row)


def clear_row(batch: SamplingBatch, slot: jax.Array | int) -> SamplingBatch:
    """Free `slot`: it becomes inactive and neutral (its state no longer changes)."""
    neutral = jax.tree.map(
        lambda x: x[:1], SamplingBatch.empty(1, batch.vocab_size, batch.max_bias)
    )
    return write_row(batch, slot, neutral)


def fork_row(
    batch: SamplingBatch, src: jax.Array | int, dst: jax.Array | int, choice_index: jax.Array | int
) -> SamplingBatch:
    """Copy slot `src` into `dst` as choice `choice_index` of the same request (n > 1).

    Parameters, penalty counts, prompt mask and mirostat mu are copied; the fork draws from
    its own stream, keyed by the request key and `choice_index`.
    """
    copied = jax.tree.map(lambda x: x.at[dst].set(x[src]), batch)
    return dataclasses.replace(copied, choice=copied.choice.at[dst].set(choice_index))
