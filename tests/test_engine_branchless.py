"""The decode program built the GPU way holds no conditional (on GPU each one would sync with
the host inside the step), read off its lowered StableHLO on the XLA path (no CPU kernels).
The CPU form keeps its lax.conds, so the check can tell the two apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import ModelConfig
from engine.kv_cache import init_cache
from engine.model import Rows, Transformer
from engine.step import DecodeState, Programs
from tests.tiny_config import TINY

CONFIG = ModelConfig.from_hf({**TINY, "architectures": ["LlamaForCausalLM"]})
PAGE, MAX_LEN, SLOTS = 16, 128, 4
CONDITIONALS = ("stablehlo.case", "stablehlo.if")


def decode_text(branchless: bool | None, chunk: int) -> str:
    """The lowered decode program of 2 steps over SLOTS rows, with a prompt chunk if > 0."""
    programs = Programs(CONFIG, jnp.float32, 2, [0], MAX_LEN // PAGE, branchless=branchless)
    pages = SLOTS * MAX_LEN // PAGE + 1
    cache = jax.eval_shape(lambda: init_cache(CONFIG, pages, PAGE, jnp.float32))
    probe = np.zeros((1, 1), np.int32)
    params = jax.eval_shape(
        lambda: Transformer(CONFIG).init(
            jax.random.key(0), [Rows(probe, probe, probe)], init_cache(CONFIG, 1, PAGE, jnp.float32)
        )["params"]
    )
    table = np.zeros((SLOTS, MAX_LEN // PAGE), np.int32)
    state = jax.eval_shape(lambda: DecodeState.empty(table, CONFIG.vocab_size, 4))
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
