"""cpu_kernels.embedding: a tied model's token lookup from its packed LM head, bit for bit
the embedding rows it was packed from, in every packed format; and the packed tree holds no
float32 copy of a tied embedding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine import cpu_kernels
from tests.test_cpu_kernels import PACKED_AS, WEIGHTS

if not cpu_kernels.available():
    pytest.skip(
        "the CPU kernels need x86-64 with AVX2/FMA and a C++ compiler", allow_module_level=True
    )


@pytest.mark.parametrize("kind", list(WEIGHTS))
@pytest.mark.parametrize(("k", "n", "tokens"), [(64, 40, 7), (96, 37, 100)])
def test_embedding_rows_are_the_packed_columns_exactly(kind, k, n, tokens):
    w = WEIGHTS[kind](k, n)  # [K, N]: the head, whose columns are embedding rows
    packed = cpu_kernels.pack(w)
    assert (packed.dtype, packed.shape[-1]) == PACKED_AS[kind]
    ids = np.random.default_rng(tokens).integers(0, n, (2, tokens)).astype(np.int32)
    ids[0, :3] = [0, n - 1, 16]  # first, last, a panel's first column
    got = np.asarray(jax.jit(cpu_kernels.embedding)(packed, ids))
    assert got.shape == (2, tokens, k)
    np.testing.assert_array_equal(got, w.T[ids])


def test_ids_past_the_vocabulary_read_zeros():
    w = WEIGHTS["q8_0"](64, 20)  # 2 panels: columns 20 .. 31 are padding
    ids = np.array([19, 20, 31, 32, -1, 1 << 30], np.int32)
    got = np.asarray(jax.jit(cpu_kernels.embedding)(cpu_kernels.pack(w), ids))
    np.testing.assert_array_equal(got[0], w[:, 19])
    assert not got[1:].any()


def test_a_tied_models_packed_tree_has_no_float32_embedding():
    from engine.loading import load_model
    from engine.weights import pack_for_cpu_kernels
    from tests.engine_fixtures import tiny_model_dir

    loaded = load_model(str(tiny_model_dir()))
    assert loaded.config.tie_word_embeddings
    embed = np.asarray(loaded.params["embed_tokens"])
    packed = pack_for_cpu_kernels(loaded.params, loaded.config)
    assert "embed_tokens" not in packed
    ids = np.arange(embed.shape[0], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.embedding(packed["lm_head"], ids)), embed)
