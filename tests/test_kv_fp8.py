"""fp8 (e4m3) KV pages with a scale: the write/read round trip of the engine's pools and of
engine/attention's layout, and paged attention from fp8 pages against the float reference
(within what e4m3's rounding allows) and against the reference on the dequantized pages."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from engine.attention import fuse_kv, init_pages, paged_attention, split_kv, write_kv
from engine.config import ModelConfig
from engine.fp8 import E4M3, E4M3_MAX, RELATIVE_ERROR, SUBNORMAL_ERROR, from_e4m3, to_e4m3
from engine.kv_cache import (
    CacheConfigError,
    ScaledPages,
    copy_page,
    init_cache,
    kv_dtype_named,
    pool_pages,
    read_pages,
    write_pages,
    write_prefix,
)
from serving.cli import main
from tests.test_paged_attention import CASES, DECODE, MIXED, Batch, make_batch
from tests.tiny_config import TINY

K_SCALE, V_SCALE = 0.02, 0.03  # unit normal K/V stored up to ~250: inside +-448
K_MAX = np.float32(E4M3_MAX) * np.float32(K_SCALE)  # what a saturated K reads back as
RNG = np.random.default_rng(8)
# 2 layers of 2 KV heads of 16 (64 / 4 query heads)
CONFIG = ModelConfig.from_hf({**TINY, "architectures": ["LlamaForCausalLM"]})


def e4m3_error(x: np.ndarray, scale: float) -> np.ndarray:
    """The most rounding to e4m3 (with `scale`) may move each value."""
    return RELATIVE_ERROR * np.abs(x) + SUBNORMAL_ERROR * scale


def test_kv_dtype_names():
    assert kv_dtype_named("fp8") == kv_dtype_named("float8_e4m3fn") == E4M3
    assert kv_dtype_named(jnp.float8_e4m3fn) == E4M3
    with pytest.raises(CacheConfigError, match="fp8"):
        kv_dtype_named("float8_e5m2")


def test_the_cli_takes_fp8(monkeypatch):
    ran = []
    monkeypatch.setattr("serving.cli.cmd_serve", ran.append)
    monkeypatch.setattr("serving.cli._configure_logging", lambda level: None)
    main(["serve", "--kv-cache-dtype", "fp8"])
    main(["serve", "--kv-cache-dtype", "float8_e4m3fn"])
    assert [kv_dtype_named(a.kv_cache_dtype) for a in ran] == [E4M3, E4M3]


def test_a_byte_budget_holds_four_times_the_float32_pages():
    f32_page = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 positions, 2 heads of 16
    args = (16, 50 * f32_page, 1000, 64)  # page_size, budget, max_seqs, max_len
    assert pool_pages(CONFIG, 4, *args) == 50
    assert pool_pages(CONFIG, E4M3.itemsize, *args) == 200


def test_engine_pools_round_trip_and_saturate():
    cache = init_cache(CONFIG, 6, 4, E4M3, scales=[(K_SCALE, V_SCALE), (0.5, 2.0)])
    assert [(k.scale, v.scale) for k, v in cache] == [(K_SCALE, V_SCALE), (0.5, 2.0)]
    pool = cache[0][0]
    table = np.array([[4, 1, 3], [0, 5, 2]], np.int32)
    new = RNG.standard_normal((2, 12, 2, 16)).astype(np.float32)
    new[0, 0, 0, :3] = [1e4, -1e4, K_MAX * 1.04]  # past the range: saturate
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    written = jax.jit(write_pages)(pool, new, positions, table)
    assert isinstance(written, ScaledPages) and written.dtype == E4M3
    got = np.asarray(jax.jit(read_pages, static_argnums=(2, 3))(written, table, 12, jnp.float32))
    want = new.transpose(0, 2, 1, 3)  # [B, heads, positions, D]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0, 0, 0, :3], [K_MAX, -K_MAX, K_MAX])
    inside = np.abs(want) <= K_MAX
    assert (np.abs(got - want) <= e4m3_error(want, K_SCALE))[inside].all()
    # A prefilled prefix and a page copy keep the codes and the scale.
    prefix = jax.jit(write_prefix)(pool, want[1:], table[1])
    np.testing.assert_array_equal(
        np.asarray(prefix.codes[table[1]]).view(np.uint8),
        np.asarray(written.codes[table[1]]).view(np.uint8),
    )
    copied = jax.jit(copy_page)(written, 4, 0)
    assert copied.scale == K_SCALE
    np.testing.assert_array_equal(
        np.asarray(copied.codes[0]).view(np.uint8), np.asarray(written.codes[4]).view(np.uint8)
    )


def test_write_kv_round_trips_and_saturates():
    k, v = RNG.standard_normal((2, 6, 2, 8)).astype(np.float32)
    k[0, 0, :2] = [1e6, -1e6]  # past 448 * K_SCALE
    pages = init_pages(4, 2, 2, 8, E4M3)
    slots = np.array([0, 1, 2, 5, 6, -1], np.int32)  # the last row is padding
    pages = jax.jit(write_kv, static_argnums=(4, 5))(pages, k, v, slots, K_SCALE, V_SCALE)
    assert pages.dtype == E4M3
    flat_k, flat_v = (np.asarray(x).reshape(8, 2, 8) for x in split_kv(pages))
    got_k = np.asarray(from_e4m3(jnp.asarray(flat_k[slots[:5]]), K_SCALE, jnp.float32))
    got_v = np.asarray(from_e4m3(jnp.asarray(flat_v[slots[:5]]), V_SCALE, jnp.float32))
    np.testing.assert_array_equal(got_k[0, 0, :2], [K_MAX, -K_MAX])
    k[0, 0, :2] = got_k[0, 0, :2]
    assert (np.abs(got_k - k[:5]) <= e4m3_error(k[:5], K_SCALE)).all()
    assert (np.abs(got_v - v[:5]) <= e4m3_error(v[:5], V_SCALE)).all()
    assert not np.asarray(pages, np.float32).reshape(8, 4, 8)[[3, 4, 7]].any()  # untouched


def fp8_batch(b: Batch) -> tuple[Batch, Batch]:
    """(b with its pages stored as e4m3, b with those pages dequantized to float32)."""
    k, v = split_kv(b.kv_pages)
    k8, v8 = to_e4m3(k, K_SCALE), to_e4m3(v, V_SCALE)
    stored = dataclasses.replace(b, kv_pages=fuse_kv(k8, v8))
    deq = fuse_kv(from_e4m3(k8, K_SCALE, jnp.float32), from_e4m3(v8, V_SCALE, jnp.float32))
    return stored, dataclasses.replace(b, kv_pages=deq)


def e4m3_attention_bound(b: Batch, deq: Batch, *, sm_scale, sliding_window=None, **_):
    """Per output element, the most e4m3 rounding of K and V can move attention.

    Each stored element is off by at most e = 2^-4 |x| + 2^-10 scale, so each logit by at
    most eps = sm_scale * sum_d |q_d| e(k_d) (a soft cap only shrinks it), each softmax
    weight by a factor within e^(+-2 eps), and with o = sum_j p_j v_j:
        |o' - o| <= (e^(2 eps) - 1) sum_j p_j |v'_j - o| + sum_j p_j e(v_j)
    over the row's visible keys j, in float64 from the float batch's weights."""
    q, kv, kv8 = (np.asarray(x, np.float64) for x in (b.q, b.kv_pages, deq.kv_pages))
    page_size, group = kv.shape[1], q.shape[1] // (kv.shape[2] // 2)
    bound = np.zeros_like(q)
    for s in range(int(b.num_seqs[0])):
        start, end, kv_len = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1]), int(b.kv_lens[s])
        table = np.asarray(b.page_indices[s])
        slots = [(table[p // page_size], p % page_size) for p in range(kv_len)]
        k, v = (
            np.stack([kv[i, o, 0::2] for i, o in slots]),
            np.stack([kv[i, o, 1::2] for i, o in slots]),
        )
        v8 = np.stack([kv8[i, o, 1::2] for i, o in slots])
        for t in range(start, end):
            pos = kv_len - (end - t)
            keys = slice(0 if sliding_window is None else max(0, pos - sliding_window + 1), pos + 1)
            for h in range(q.shape[1]):
                kh, vh, v8h = k[keys, h // group], v[keys, h // group], v8[keys, h // group]
                logits = kh @ q[t, h] * sm_scale
                p = np.exp(logits - logits.max())
                p /= p.sum()
                eps = sm_scale * (e4m3_error(kh, K_SCALE) @ np.abs(q[t, h])).max()
                spread = p @ np.abs(v8h - p @ vh)
                bound[t, h] = np.expm1(2 * eps) * spread + p @ e4m3_error(vh, V_SCALE)
    return bound


@pytest.mark.parametrize("name", ["mixed", "mixed-window-softcap", "decode-gqa-window"])
def test_attention_from_fp8_pages_is_the_float_attention_within_e4m3s_error(name):
    shape, opts = CASES[name]
    b = make_batch(11, **shape)
    # q halved: logits spread over a few units, as a trained model's (the bound grows as
    # e^(2 eps), and eps with |q|).
    b = dataclasses.replace(b, q=b.q * 0.5)
    stored, deq = fp8_batch(b)
    run = jax.jit(lambda *a, **kw: paged_attention(*a, sm_scale=0.25, **opts, **kw))
    got = np.asarray(run(*stored.args, k_scale=K_SCALE, v_scale=V_SCALE))
    # The reference on the dequantized pages: the same values, so the same attention.
    np.testing.assert_allclose(got, run(*deq.args), atol=1e-6, rtol=1e-6)
    want = np.asarray(run(*b.args))
    bound = e4m3_attention_bound(b, deq, sm_scale=0.25, **opts)
    assert (np.abs(got - want) <= bound + 1e-6).all(), np.abs(got - want).max()  # 1e-6: f32
    assert np.abs(got - want).max() > 0  # the pages did change


def test_fp8_pages_read_as_the_reference_shipped_beside_the_tpu_kernel_reads_them():
    stored, _ = fp8_batch(make_batch(12, **MIXED))
    opts = dict(sm_scale=0.3, sliding_window=4, k_scale=K_SCALE, v_scale=V_SCALE)
    got = paged_attention(*stored.args, impl="reference", **opts)[: stored.num_valid]
    lens, cu, n = (np.asarray(x) for x in (stored.kv_lens, stored.cu_q_lens, stored.num_seqs))
    shipped = ref_ragged_paged_attention(
        stored.q, stored.kv_pages, lens, stored.page_indices, cu, n, **opts
    )
    np.testing.assert_allclose(got, shipped, atol=1e-5)


def test_gpu_kernel_in_interpret_mode_reads_fp8_pages_as_the_reference():
    stored, _ = fp8_batch(make_batch(13, **DECODE))
    opts = dict(sm_scale=0.3, k_scale=K_SCALE, v_scale=V_SCALE)
    got = paged_attention(*stored.args, impl="gpu", **opts)
    want = paged_attention(*stored.args, impl="reference", **opts)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_e4m3_saturates_where_a_plain_cast_gives_nan():
    x = jnp.asarray([E4M3_MAX * 2.2, -1e9, 1.0])  # scale 2: the first two saturate
    assert np.isnan(np.asarray((x / 2).astype(E4M3), np.float32)[:2]).all()
    np.testing.assert_array_equal(
        np.asarray(from_e4m3(to_e4m3(x, 2.0), 2.0, jnp.float32)), [896.0, -896.0, 1.0]
    )
