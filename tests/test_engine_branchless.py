"""The decode program built the GPU way holds no conditional (on GPU each one would sync with
the host inside the step), read off its lowered StableHLO on the XLA path (no CPU kernels).
The CPU form keeps its lax.conds, so the check can tell the two apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from engine.step import Programs
from tests.test_engine_memory import CONFIG, PAGE, abstract_args

MAX_LEN, SLOTS = 128, 4
CONDITIONALS = ("stablehlo.case", "stablehlo.if")


def decode_text(branchless: bool | None, chunk: int) -> str:
    """The lowered decode program of 2 steps over SLOTS rows, with a prompt chunk if > 0."""
    programs = Programs(CONFIG, jnp.float32, 2, [0], MAX_LEN // PAGE, branchless=branchless)
    params, cache, state = abstract_args(SLOTS, MAX_LEN)
    extra = (programs.chunk_shape(chunk),) if chunk else ()
    masks = programs.masks_shape(SLOTS)
    lowered = programs.decode.lower(
        params, cache, state, masks, *extra, k=2, kv_len=MAX_LEN, rows=SLOTS
    )
    return lowered.as_text()


def conditionals(text: str) -> list[str]:
    return [c for c in CONDITIONALS if c in text]


@pytest.mark.parametrize("chunk", [0, 16])
def test_gpu_form_of_the_decode_program_has_no_conditional(chunk):
    gpu = decode_text(branchless=True, chunk=chunk)
    assert not conditionals(gpu)
    assert "stablehlo.while" in gpu  # the k-step scan: the text does hold the step
    cond = decode_text(branchless=False, chunk=chunk)
    assert conditionals(cond)  # the CPU / TPU form
    # Left to the engine, the form follows the backend the program is traced for.
    assert decode_text(branchless=None, chunk=chunk) == (
        gpu if jax.default_backend() == "gpu" else cond
    )
