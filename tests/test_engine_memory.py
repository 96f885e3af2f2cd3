"""What the compiled step programs need in temporary memory, from XLA's own accounting
(`jit(...).lower(...).compile().memory_analysis()`), on a tiny model.

A mixed step (decode rows plus a prompt chunk of C tokens) must grow linearly with C: each
chunk row attends over its sequence's pages, never a [C, C] score matrix. The XLA prefill of
a whole prompt, which does build one, is measured the same way to show the test can tell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig
from engine.decode_state import DecodeState
from engine.kv_cache import init_cache
from engine.model import Rows, Transformer
from engine.step import Programs
from tests.tiny_config import TINY

CONFIG = ModelConfig.from_hf({**TINY, "architectures": ["LlamaForCausalLM"]})
PAGE, MAX_LEN, SLOTS = 16, 2048, 4
SIZES = (256, 512, 1024)


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def growth(temp: list[int]) -> float:
    """How much more the second doubling of the size adds than the first: 2 for linear
    growth, 4 for quadratic."""
    return (temp[2] - temp[1]) / (temp[1] - temp[0])


def abstract_args(slots: int, max_len: int) -> tuple:
    """(params, cache, decode state) of CONFIG as ShapeDtypeStructs: a cache of pages of PAGE
    tokens, enough for `slots` sequences of `max_len`."""
    pages = slots * max_len // PAGE + 1
    cache = jax.eval_shape(lambda: init_cache(CONFIG, pages, PAGE, jnp.float32))
    probe = np.zeros((1, 1), np.int32)
    params = jax.eval_shape(
        lambda: Transformer(CONFIG).init(
            jax.random.key(0), [Rows(probe, probe, probe)], init_cache(CONFIG, 1, PAGE, jnp.float32)
        )["params"]
    )
    table = np.zeros((slots, max_len // PAGE), np.int32)
    return params, cache, shapes(DecodeState.empty(table, CONFIG.vocab_size, 4))


def test_mixed_step_memory_grows_linearly_with_the_token_budget():
    programs = Programs(CONFIG, jnp.float32, 2, [], MAX_LEN // PAGE)
    params, cache, state = abstract_args(SLOTS, MAX_LEN)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    mixed, whole = [], []
    for size in SIZES:
        chunk = programs.chunk_shape(size)
        masks = programs.masks_shape(SLOTS)
        lowered = programs.decode.lower(
            params, cache, state, masks, scalar, chunk, k=1, kv_len=64, rows=SLOTS
        )
        mixed.append(lowered.compile().memory_analysis().temp_size_in_bytes)
        ids = jax.ShapeDtypeStruct((1, size), jnp.int32)
        prefill = programs.prefill.compiled(params, ids, scalar)
        whole.append(prefill.memory_analysis().temp_size_in_bytes)
    assert mixed[0] < mixed[1] < mixed[2]
    assert growth(mixed) < 2.5, mixed
    assert growth(whole) > 3.5, whole  # the [T, T] scores of a whole prefill on XLA's ops
