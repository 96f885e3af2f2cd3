"""The attention kernels on float16 and bfloat16 page pools: what they write is the float32
key / value rounded to nearest even (as XLA's convert rounds), and what they compute is the
float64 softmax of the definition over the pool they leave."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from engine import cpu_kernels
from engine.kv_cache import one_page_per_slot
from tests.test_cpu_kernels import attend_at, rotate_half

if not cpu_kernels.available():
    pytest.skip(
        "the CPU kernels need x86-64 with AVX2/FMA and a C++ compiler", allow_module_level=True
    )

RNG = np.random.default_rng(5)
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# One unit in the last place of each type, relative: a key rotated in float32 and rounded may
# land one step from the float64 rotation rounded.
ULP = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def pool(shape, dtype) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32).astype(dtype)


def projection(rows: int, heads: int, kv_heads: int, dim: int):
    qkv = RNG.standard_normal((rows, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    angles = RNG.uniform(0, 6, (rows, dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    x = qkv.astype(np.float64).reshape(rows, heads + 2 * kv_heads, dim)
    q = rotate_half(x[:, :heads], cos[:, None], sin[:, None])
    k = rotate_half(x[:, heads : heads + kv_heads], cos[:, None], sin[:, None])
    v = qkv.reshape(rows, heads + 2 * kv_heads, dim)[:, heads + kv_heads :]
    return qkv, cos, sin, q, k, v


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("window", [None, 8])
def test_decode_attention_on_a_half_precision_pool(name, window):
    dtype = DTYPES[name]
    slots, heads, kv_heads, length, dim = 4, 6, 2, 40, 64
    keys, values = (
        pool((slots, kv_heads, length, dim), dtype),
        pool((slots, kv_heads, length, dim), dtype),
    )
    positions = np.array([0, 17, 39, 5], np.int32)
    qkv, cos, sin, q, k, v = projection(slots, heads, kv_heads, dim)
    call = jax.jit(cpu_kernels.decode_attention, static_argnums=(7, 8))
    got = call(qkv, cos, sin, positions, one_page_per_slot(slots), keys, values, heads, window)
    out, new_keys, new_values = (np.asarray(a) for a in got)
    assert new_keys.dtype == new_values.dtype == np.dtype(dtype)

    want_keys, want_values = keys.copy(), values.copy()
    for r, p in enumerate(positions):
        want_keys[r, :, p] = k[r].astype(np.float32).astype(dtype)
        want_values[r, :, p] = v[r].astype(dtype)  # float32 rounded to nearest even
    np.testing.assert_array_equal(new_values, want_values)
    np.testing.assert_allclose(
        new_keys.astype(np.float64), want_keys.astype(np.float64), rtol=ULP[name], atol=1e-6
    )
    # Everything but the written rows is untouched.
    written = np.zeros(keys.shape, bool)
    written[np.arange(slots), :, positions] = True
    np.testing.assert_array_equal(new_keys[~written], keys[~written])

    ks, vs = new_keys.astype(np.float64), new_values.astype(np.float64)
    want = np.stack([attend_at(p, q[r], ks[r], vs[r], window) for r, p in enumerate(positions)])
    np.testing.assert_allclose(out, want.reshape(out.shape), atol=5e-6)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize(("start", "valid"), [(0, 11), (17, 7), (33, 11)])
def test_extend_attention_on_a_half_precision_pool(name, start, valid):
    dtype = DTYPES[name]
    slots, slot, length, heads, kv_heads, dim, new = 3, 1, 40, 6, 2, 64, 11
    keys, values = (
        pool((slots, kv_heads, length, dim), dtype),
        pool((slots, kv_heads, length, dim), dtype),
    )
    qkv, cos, sin, q, k, v = projection(new, heads, kv_heads, dim)
    call = jax.jit(cpu_kernels.extend_attention, static_argnums=(8, 9))
    got = call(qkv[None], cos, sin, start, valid, np.array([slot]), keys, values, heads, None)
    out, new_keys, new_values = (np.asarray(a) for a in got)

    want_keys, want_values = keys.copy(), values.copy()
    written = [t for t in range(valid) if start + t < length]  # nothing past the pages
    for t in written:
        want_keys[slot, :, start + t] = k[t].astype(np.float32).astype(dtype)
        want_values[slot, :, start + t] = v[t].astype(dtype)
    np.testing.assert_array_equal(new_values, want_values)
    np.testing.assert_allclose(
        new_keys.astype(np.float64), want_keys.astype(np.float64), rtol=ULP[name], atol=1e-6
    )
    ks, vs = new_keys[slot].astype(np.float64), new_values[slot].astype(np.float64)
    want = np.zeros((new, heads, dim))
    for t in range(valid):
        want[t] = attend_at(min(start + t, length - 1), q[t], ks, vs, None)
    np.testing.assert_allclose(out[0], want.reshape(new, -1), atol=5e-6)


def test_a_pool_of_another_type_is_refused():
    keys = np.zeros((1, 1, 8, 4), np.int32)
    qkv = np.zeros((1, 12), np.float32)
    cos = sin = np.zeros((1, 2), np.float32)
    with pytest.raises(Exception, match="float32, float16 or bfloat16"):
        cpu_kernels.decode_attention(
            qkv, cos, sin, np.zeros(1, np.int32), np.zeros((1, 1), np.int32), keys, keys, 1, None
        )
