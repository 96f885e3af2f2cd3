"""engine.cpu_kernels against exact math: the matmul in each packed format, the packing's
exactness, and decode attention against a float64 softmax written from its definition."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engine import cpu_kernels
from engine.kv_cache import one_page_per_slot
from samplers import SamplingParams
from samplers.pipeline import sample
from tests.test_samplers_support import batch_of

if not cpu_kernels.available():
    pytest.skip(
        "the CPU kernels need x86-64 with AVX2/FMA and a C++ compiler", allow_module_level=True
    )

RNG = np.random.default_rng(0)


def q4_1_weights(k: int, n: int) -> np.ndarray:
    """What GGUF's Q4_1 dequantizes to: per block of 32 rows, f16 scale * (0..15) + f16 min."""
    d = RNG.uniform(0.001, 0.05, (k // 32, n)).astype(np.float16).astype(np.float32)
    m = RNG.uniform(-0.4, 0.0, (k // 32, n)).astype(np.float16).astype(np.float32)
    q = RNG.integers(0, 16, (k // 32, 32, n))
    q[:, 0], q[:, 1] = 0, 15  # as the quantizer makes them: the block's min and max
    return (d[:, None] * q + m[:, None]).astype(np.float32).reshape(k, n)


def q4_0_weights(k: int, n: int) -> np.ndarray:
    """GGUF's Q4_0: per block of 32 rows, f16 scale (either sign) * (codes 0..15 - 8)."""
    d = RNG.uniform(-0.05, 0.05, (k // 32, n)).astype(np.float16).astype(np.float32)
    q = RNG.integers(0, 16, (k // 32, 32, n))
    q[:, 0] = 0  # as the quantizer makes it: the block's largest magnitude is -8 * scale
    return (d[:, None] * (q - 8)).astype(np.float32).reshape(k, n)


def q8_0_weights(k: int, n: int) -> np.ndarray:
    """GGUF's Q8_0: per block of 32 rows, f16 scale * (-127..127), the extreme present."""
    d = RNG.uniform(0.001, 0.05, (k // 32, n)).astype(np.float16).astype(np.float32)
    q = RNG.integers(-127, 128, (k // 32, 32, n))
    q[:, 3] = -127
    return (d[:, None] * q).astype(np.float32).reshape(k, n)


def q4_f32_weights(k: int, n: int) -> np.ndarray:
    """Q4_1's grid with scales of 12 significant bits, which float16 (q4 blocks) cannot hold
    and float32 holds exactly, as it does every value of the grid."""
    d = (2049 + 2 * RNG.integers(0, 1000, (k // 32, n))) * 2.0**-21
    m = -RNG.integers(0, 400, (k // 32, n)) * 2.0**-10
    q = RNG.integers(0, 16, (k // 32, 32, n))
    q[:, 0], q[:, 1] = 0, 15
    return (d[:, None] * q + m[:, None]).astype(np.float32).reshape(k, n)


WEIGHTS = {
    "float32": lambda k, n: RNG.standard_normal((k, n)).astype(np.float32),
    "bfloat16": lambda k, n: (
        RNG.standard_normal((k, n)).astype(ml_dtypes.bfloat16).astype(np.float32)
    ),
    "q4_0": q4_0_weights,
    "q4_1": q4_1_weights,
    "q8_0": q8_0_weights,
    "q4_f32": q4_f32_weights,
}
PACKED_AS = {  # dtype, bytes per panel row (float formats) or per 32-row block (q4, q8)
    "float32": (np.float32, 16),
    "bfloat16": (ml_dtypes.bfloat16, 16),
    "q4_0": (np.uint8, 320),
    "q4_1": (np.uint8, 320),
    "q8_0": (np.uint8, 544),
    "q4_f32": (np.uint8, 640),
}


def matmul(x: np.ndarray, packed: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(jax.jit(cpu_kernels.matmul, static_argnums=2)(jnp.asarray(x), packed, n))


@pytest.mark.parametrize("kind", list(WEIGHTS))
@pytest.mark.parametrize(
    ("m", "k", "n"),
    # 49 rows: a last chunk of one row (the one-row path inside a longer call).
    [(1, 64, 16), (1, 320, 40), (3, 96, 37), (7, 32, 100), (49, 64, 33), (130, 64, 49)],
)
def test_matmul_equals_exact_math_in_every_format(kind, m, k, n):
    w = WEIGHTS[kind](k, n)
    packed = cpu_kernels.pack(w)
    assert (packed.dtype, packed.shape[-1]) == PACKED_AS[kind]
    x = RNG.standard_normal((m, k)).astype(np.float32)
    got = matmul(x, packed, n)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # float32 accumulation: error within k roundings of the sum of magnitudes.
    bound = k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w))
    assert got.shape == (m, n)
    assert np.all(np.abs(got - exact) <= bound + 1e-30)


def test_padding_rows_are_left_zero_and_valid_rows_unchanged():
    """A prompt padded to its bucket: rows from `valid_rows` on are not computed, and the
    rest come out bit for bit as in the full call (no chunk of one row here: that one takes
    the one-row path, which rounds differently)."""
    k, n = 64, 40
    packed = cpu_kernels.pack(WEIGHTS["q4_1"](k, n))
    x = RNG.standard_normal((2, 50, k)).astype(np.float32)
    full = matmul(x, packed, n)
    call = jax.jit(cpu_kernels.matmul, static_argnums=2)
    for valid in (0, 2, 47, 57, 100):
        got = np.asarray(call(jnp.asarray(x), packed, n, jnp.int32(valid))).reshape(100, n)
        np.testing.assert_array_equal(got[:valid], full.reshape(100, n)[:valid])
        assert not got[valid:].any()


def test_concurrent_calls_each_get_the_result_they_get_alone():
    """Calls from several threads at once: one holds the spinning helper team, the others
    fall back to XLA's pool; either way each call's units are its own."""
    k, n = 256, 300
    packed = cpu_kernels.pack(WEIGHTS["q4_1"](k, n))
    xs = [RNG.standard_normal((m, k)).astype(np.float32) for m in (1, 2, 7, 49) * 3]
    alone = [matmul(x, packed, n) for x in xs]
    with ThreadPoolExecutor(len(xs)) as pool:
        for _ in range(5):
            for got, want in zip(pool.map(lambda x: matmul(x, packed, n), xs), alone, strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "q4_f32", "bfloat16"])
def test_compact_formats_give_the_float32_result_bit_for_bit(kind):
    """A compact format holds the same values, so where several rows share the decoded
    weights the same sums come out: any difference from the float32 panels would be a
    decoding error, not rounding. (A single row sums q4/q8 blocks as scale * sum(x * code)
    + offset * sum(x), which rounds differently: tested against exact math above.)"""
    k, n = 96, 40
    w = WEIGHTS[kind](k, n)
    as_f32 = np.ascontiguousarray(np.pad(w, ((0, 0), (0, 8))).reshape(k, 3, 16).transpose(1, 0, 2))
    for m in (2, 4, 6, 13):
        x = RNG.standard_normal((m, k)).astype(np.float32)
        np.testing.assert_array_equal(matmul(x, cpu_kernels.pack(w), n), matmul(x, as_f32, n))


def test_exact_blocks_finds_quantized_blocks_and_refuses_others():
    w = q4_1_weights(64, 20)
    scale, offset, codes = cpu_kernels.exact_blocks(w)
    rebuilt = scale.repeat(32, 0).astype(np.float64) * codes + offset.repeat(32, 0)
    np.testing.assert_array_equal(rebuilt.astype(np.float32), w)
    assert codes.min() >= 0 and codes.max() <= 15
    assert cpu_kernels.exact_blocks(RNG.standard_normal((64, 20)).astype(np.float32)) is None
    # One weight off its block's grid sends the whole matrix to a float format.
    w[5, 3] += 1e-4
    assert cpu_kernels.pack(w).dtype == np.float32


def rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend_at(p, q, keys, values, window):
    """Softmax attention, by its definition, of the query heads q [H, D] at position p over
    keys / values [K, S, D] at positions max(0, p + 1 - window) .. p -> [H, D]."""
    heads, kv_heads, dim = q.shape[0], keys.shape[0], q.shape[-1]
    seen = slice(0 if window is None else max(0, p + 1 - window), p + 1)
    out = np.zeros(q.shape)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        scores = keys[kv, seen] @ q[h] / np.sqrt(dim)
        e = np.exp(scores - scores.max())
        out[h] = e / e.sum() @ values[kv, seen]
    return out


@pytest.mark.parametrize("head_dim", [4, 64, 68, 80])
@pytest.mark.parametrize("window", [None, 8])
# q_scale 30: scores spread over hundreds, so the kernel's exp meets arguments from 0 down
# past its clamp at -87 (where a float's e^x stops being normal). Float32 scores that large
# are themselves ~1e-5 off, which e^x turns into relative error (std::exp did the same).
@pytest.mark.parametrize(("q_scale", "atol"), [(1.0, 2e-6), (30.0, 1e-5)])
def test_decode_attention_writes_the_cache_and_attends_to_visible_positions(
    head_dim, window, q_scale, atol
):
    slots, heads, kv_heads, length = 5, 6, 2, 40
    keys = RNG.standard_normal((slots, kv_heads, length, head_dim)).astype(np.float32)
    values = RNG.standard_normal((slots, kv_heads, length, head_dim)).astype(np.float32)
    positions = np.array([0, 17, 39, 5, 40], np.int32)  # the last past the cache: not written
    rows = len(positions) - 1  # 4 rows of a 5-slot cache, and one more on its own
    qkv = RNG.standard_normal((5, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    qkv[:, : heads * head_dim] *= q_scale
    angles = RNG.uniform(0, 6, (5, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    call = jax.jit(cpu_kernels.decode_attention, static_argnums=(7, 8))
    table = one_page_per_slot(slots)  # row b in cache row (page) b
    out, new_keys, new_values = (
        np.asarray(a)
        for a in call(
            qkv[:rows],
            cos[:rows],
            sin[:rows],
            positions[:rows],
            table[:rows],
            keys,
            values,
            heads,
            window,
        )
    )

    x = qkv.astype(np.float64).reshape(5, heads + 2 * kv_heads, head_dim)
    q = rotate_half(x[:, :heads], cos[:, None], sin[:, None])
    k = rotate_half(x[:, heads : heads + kv_heads], cos[:, None], sin[:, None])
    want_keys, want_values = keys.astype(np.float64), values.astype(np.float64)
    for r in range(rows):
        want_keys[r, :, positions[r]] = k[r]
        want_values[r, :, positions[r]] = x[r, heads + kv_heads :]
    np.testing.assert_allclose(new_keys, want_keys, atol=1e-6)
    np.testing.assert_array_equal(new_values, want_values.astype(np.float32))
    want = np.stack(
        [attend_at(positions[r], q[r], want_keys[r], want_values[r], window) for r in range(rows)]
    )
    np.testing.assert_allclose(out, want.reshape(out.shape), atol=atol)

    # A position past the cache writes nothing and sees the whole cache.
    out, new_keys, _ = call(
        qkv[4:], cos[4:], sin[4:], positions[4:], table[4:], keys, values, heads, None
    )
    np.testing.assert_array_equal(np.asarray(new_keys), keys)
    assert np.isfinite(np.asarray(out)).all()


def rms_norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_layer_equals_the_llama_layer_from_its_definition(window):
    slots, length, d, heads, kv_heads, dim, inter, eps = 4, 24, 64, 4, 2, 16, 96, 1e-5
    width = (heads + 2 * kv_heads) * dim
    # One matrix in each packed format the default model's layers use, and a plain one.
    w = {
        "qkv": WEIGHTS["q4_1"](d, width),
        "o": WEIGHTS["q8_0"](heads * dim, d),
        "gate_up": WEIGHTS["q4_0"](d, 2 * inter),
        "down": WEIGHTS["bfloat16"](inter, d) * 0.1,
    }
    norms = [RNG.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2)]
    weights = {
        "input_layernorm": {"weight": norms[0]},
        "post_attention_layernorm": {"weight": norms[1]},
        "self_attn": {
            "qkv_proj": {"kernel": cpu_kernels.pack(w["qkv"])},
            "o_proj": {"kernel": cpu_kernels.pack(w["o"])},
        },
        "mlp": {
            "gate_up_proj": {"kernel": cpu_kernels.pack(w["gate_up"])},
            "down_proj": {"kernel": cpu_kernels.pack(w["down"])},
        },
    }
    keys = RNG.standard_normal((slots, kv_heads, length, dim)).astype(np.float32)
    values = RNG.standard_normal((slots, kv_heads, length, dim)).astype(np.float32)
    positions = np.array([0, 9, 23], np.int32)  # 3 rows of a 4-slot cache
    rows = len(positions)
    x = RNG.standard_normal((rows, d)).astype(np.float32)
    angles = RNG.uniform(0, 6, (rows, dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    call = jax.jit(cpu_kernels.decode_layer, static_argnums=(8, 9, 10))
    table = one_page_per_slot(rows)
    got = call(x, weights, cos, sin, positions, table, keys, values, heads, window, eps)
    y, new_keys, new_values = (np.asarray(a) for a in got)

    f64 = {name: m.astype(np.float64) for name, m in w.items()}
    qkv = (rms_norm(x.astype(np.float64), norms[0], eps) @ f64["qkv"]).reshape(rows, -1, dim)
    q = rotate_half(qkv[:, :heads], cos[:, None], sin[:, None])
    k = rotate_half(qkv[:, heads : heads + kv_heads], cos[:, None], sin[:, None])
    want_keys, want_values = keys.astype(np.float64), values.astype(np.float64)
    attn = np.zeros((rows, heads, dim))
    for r, p in enumerate(positions):
        want_keys[r, :, p], want_values[r, :, p] = k[r], qkv[r, heads + kv_heads :]
        attn[r] = attend_at(p, q[r], want_keys[r], want_values[r], window)
    want = x + attn.reshape(rows, -1) @ f64["o"]
    gate, up = np.split(rms_norm(want, norms[1], eps) @ f64["gate_up"], 2, axis=-1)
    want = want + (gate / (1 + np.exp(-gate)) * up) @ f64["down"]
    np.testing.assert_allclose(new_keys, want_keys, atol=2e-5)
    np.testing.assert_allclose(new_values, want_values, atol=2e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert np.abs(y - x).max() > 0.1  # the layer did something


@pytest.mark.parametrize("head_dim", [4, 64, 68, 80])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_attention_equals_rotary_causal_softmax(head_dim, window):
    rows, length, heads, kv_heads, valid = 2, 19, 6, 2, 30  # row 1 ends in 8 padding tokens
    width = (heads + 2 * kv_heads) * head_dim
    qkv = RNG.standard_normal((rows, length, width)).astype(np.float32)
    angles = RNG.uniform(0, 6, (length, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    got = jax.jit(cpu_kernels.prefill_attention, static_argnums=(4, 5, 6))(
        qkv, cos, sin, valid, heads, kv_heads, window
    )
    out, keys, values = (np.asarray(x) for x in got)

    x = qkv.astype(np.float64).reshape(rows, length, heads + 2 * kv_heads, head_dim)
    q = rotate_half(x[:, :, :heads], cos[:, None], sin[:, None])
    k = rotate_half(x[:, :, heads : heads + kv_heads], cos[:, None], sin[:, None])
    v = x[:, :, heads + kv_heads :]
    real = (np.arange(rows * length) < valid).reshape(rows, length)
    np.testing.assert_allclose(
        keys, np.where(real[:, None, :, None], k.transpose(0, 2, 1, 3), 0), atol=1e-6
    )
    np.testing.assert_array_equal(
        values, np.where(real[:, None, :, None], v.transpose(0, 2, 1, 3), 0)
    )
    want = np.zeros((rows, length, heads, head_dim))
    for r in range(rows):
        keys_r, values_r = k[r].transpose(1, 0, 2), v[r].transpose(1, 0, 2)
        for t in range(length):
            if real[r, t]:
                want[r, t] = attend_at(t, q[r, t], keys_r, values_r, window)
    np.testing.assert_allclose(out, want.reshape(out.shape), atol=2e-6)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("start", "valid"), [(0, 11), (9, 11), (17, 7), (30, 11)])
def test_extend_attention_writes_new_tokens_into_the_slot_and_attends_to_it(window, start, valid):
    slots, slot, length, heads, kv_heads, head_dim, new = 3, 1, 40, 6, 2, 64, 11
    keys = RNG.standard_normal((slots, kv_heads, length, head_dim)).astype(np.float32)
    values = RNG.standard_normal((slots, kv_heads, length, head_dim)).astype(np.float32)
    qkv = RNG.standard_normal((1, new, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    angles = RNG.uniform(0, 6, (new, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    call = jax.jit(cpu_kernels.extend_attention, static_argnums=(8, 9))
    got = call(qkv, cos, sin, start, valid, np.array([slot]), keys, values, heads, window)
    out, new_keys, new_values = (np.asarray(a) for a in got)

    x = qkv[0].astype(np.float64).reshape(new, heads + 2 * kv_heads, head_dim)
    q = rotate_half(x[:, :heads], cos[:, None], sin[:, None])
    k = rotate_half(x[:, heads : heads + kv_heads], cos[:, None], sin[:, None])
    want_keys, want_values = keys.astype(np.float64), values.astype(np.float64)
    written = [t for t in range(valid) if start + t < length]  # nothing past the cache
    for t in written:
        want_keys[slot, :, start + t] = k[t]
        want_values[slot, :, start + t] = x[t, heads + kv_heads :]
    np.testing.assert_allclose(new_keys, want_keys, atol=1e-6)  # other slots untouched too
    np.testing.assert_array_equal(new_values, want_values.astype(np.float32))
    want = np.zeros((new, heads, head_dim))
    for t in range(valid):
        last = min(start + t, length - 1)  # past the cache: sees all of it
        want[t] = attend_at(last, q[t], want_keys[slot], want_values[slot], window)
    np.testing.assert_allclose(out[0], want.reshape(new, -1), atol=2e-6)


def test_extend_attention_matches_prefill_attention_bitwise():
    """A prompt prefilled whole, or its first part prefilled and the rest extended from the
    cache, gives the same keys, values and outputs: reusing a cached prefix changes nothing."""
    heads, kv_heads, head_dim, length, split = 6, 2, 64, 24, 10
    qkv = RNG.standard_normal((1, length, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    angles = RNG.uniform(0, 6, (length, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    out, keys, values = cpu_kernels.prefill_attention(qkv, cos, sin, length, heads, kv_heads, None)
    cache = [np.zeros((2, kv_heads, 32, head_dim), np.float32) for _ in range(2)]
    _, head_k, head_v = cpu_kernels.prefill_attention(
        qkv[:, :split], cos[:split], sin[:split], split, heads, kv_heads, None
    )
    for c, part in zip(cache, (head_k, head_v), strict=True):
        c[1, :, :split] = np.asarray(part)[0]
    rest = slice(split, length)
    ext_out, ext_k, ext_v = cpu_kernels.extend_attention(
        qkv[:, rest], cos[rest], sin[rest], split, length - split, [1], *cache, heads, None
    )
    np.testing.assert_array_equal(np.asarray(ext_out)[0], np.asarray(out)[0, rest])
    np.testing.assert_array_equal(np.asarray(ext_k)[1, :, :length], np.asarray(keys)[0])
    np.testing.assert_array_equal(np.asarray(ext_v)[1, :, :length], np.asarray(values)[0])


def test_a_machine_without_a_compiler_gets_a_clear_reason(monkeypatch, tmp_path):
    import shutil

    from engine.cpu_kernels import _SOURCES, ISAS, KernelUnavailable, _build

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        _build(_SOURCES, tmp_path / "kernels.so", ISAS["avx2"])
    assert not (tmp_path / "kernels.so").exists()


@pytest.mark.parametrize(("rows", "v", "k"), [(1, 10, 10), (3, 500, 65), (5, 4000, 257), (2, 7, 0)])
def test_top_k_equals_lax_top_k_with_ties_and_infinities(rows, v, k):
    x = RNG.integers(-20, 20, (rows, v)).astype(np.float32) / 4  # many ties
    x[:, ::7] = -np.inf
    x[0, 3] = np.inf
    got = jax.jit(cpu_kernels.top_k, static_argnums=1)(x, k)
    want = jax.lax.top_k(jnp.asarray(x), k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_the_sampler_draws_the_same_tokens_with_the_top_k_kernel():
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),  # a nucleus past 64 candidates
        SamplingParams(temperature=1.0, top_k=40, min_p=0.05, seed=2),
        SamplingParams(temperature=1.3, typical_p=0.5, seed=3),
        SamplingParams(temperature=0.0),
    ]
    batch = batch_of(params, 500, slots=8)
    logits = jnp.asarray((RNG.normal(size=(8, 500)) * 0.3).astype(np.float32))
    static = ("num_logprobs", "num_candidates", "wide_candidates", "top_k")
    run = functools.partial(
        jax.jit(sample, static_argnames=static),
        num_logprobs=3,
        num_candidates=64,
        wide_candidates=256,
    )
    for _ in range(3):
        want = run(logits, batch)
        got = run(logits, batch, top_k=cpu_kernels.top_k)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        batch = want[2]
