"""Ragged paged attention (engine/attention): the reference against a float64 numpy loop, the
KV write, the Pallas kernels in interpret mode against the reference, and the reference's
memory growth.

Batches mix decode rows (q_len 1) and prefill chunks (q_len > 1, with cached tokens before
them), read pages through shuffled page tables, use GQA, and carry padding rows and padding
sequences whose table entries hold junk that every implementation must ignore.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from engine.attention import (
    choose_impl,
    init_pages,
    paged_attention,
    ragged_paged_attention_reference,
    split_kv,
    token_positions,
    token_slots,
    write_kv,
)


@dataclasses.dataclass(frozen=True)
class Batch:
    q: jax.Array  # [T, H, D]
    kv_pages: jax.Array  # [num_pages, page_size, 2 * Hkv, D]
    kv_lens: jax.Array  # i32[S]
    page_indices: jax.Array  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array  # i32[S + 1]
    num_seqs: jax.Array  # i32[1]

    @property
    def args(self) -> tuple[jax.Array, ...]:
        return dataclasses.astuple(self)

    @property
    def num_valid(self) -> int:
        return int(self.cu_q_lens[int(self.num_seqs[0])])


def make_batch(
    seed: int,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    max_seqs: int,
    num_tokens: int,
    page_size: int = 4,
    pages_per_seq: int = 4,
    num_kv_heads: int = 2,
    num_q_heads: int = 4,
    head_dim: int = 16,
) -> Batch:
    """A random batch of len(q_lens) sequences padded to max_seqs sequences, num_tokens rows."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    num_pages = max_seqs * pages_per_seq + 3  # a few pages nobody owns
    perm = rng.permutation(num_pages)[: max_seqs * pages_per_seq]
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    assert cu[n] <= num_tokens and all(q <= k for q, k in zip(q_lens, kv_lens, strict=True))
    lens = np.full(max_seqs, 5, np.int32)  # junk past num_seqs
    lens[:n] = kv_lens
    return Batch(
        q=jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_dim)), jnp.float32),
        kv_pages=jnp.asarray(
            rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)), jnp.float32
        ),
        kv_lens=jnp.asarray(lens),
        page_indices=jnp.asarray(perm.reshape(max_seqs, pages_per_seq), jnp.int32),
        cu_q_lens=jnp.asarray(cu),  # entries past num_seqs stay 0: junk, not even sorted
        num_seqs=jnp.array([n], jnp.int32),
    )


def numpy_attention(b: Batch, *, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Float64, one sequence, row and head at a time, over contiguous K/V from the table."""
    q = np.asarray(b.q, np.float64)
    kv = np.asarray(b.kv_pages, np.float64)
    page_size, group = kv.shape[1], q.shape[1] // (kv.shape[2] // 2)
    out = np.zeros_like(q)
    for s in range(int(b.num_seqs[0])):
        start, end, kv_len = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1]), int(b.kv_lens[s])
        table = np.asarray(b.page_indices[s])
        cache = np.stack([kv[table[p // page_size], p % page_size] for p in range(kv_len)])
        k, v = cache[:, 0::2], cache[:, 1::2]  # [kv_len, Hkv, D]
        for t in range(start, end):
            pos = kv_len - (end - t)
            first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(q.shape[1]):
                logits = k[first : pos + 1, h // group] @ q[t, h] * sm_scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                w = np.exp(logits - logits.max())
                out[t, h] = (w / w.sum()) @ v[first : pos + 1, h // group]
    return out


# q_lens / kv_lens: decode rows (1 / n), prefill chunks after cached tokens (q < kv), a fresh
# prompt (q == kv), page boundaries crossed and hit exactly; then padding.
MIXED = dict(q_lens=[1, 5, 1, 7, 3], kv_lens=[9, 11, 1, 7, 16], max_seqs=7, num_tokens=20)
DECODE = dict(q_lens=[1] * 5, kv_lens=[1, 4, 5, 13, 16], max_seqs=6, num_tokens=8)

CASES = {
    "mixed": (MIXED, {}),
    "mixed-window-softcap": (MIXED, dict(sliding_window=5, soft_cap=3.0)),
    "mixed-window-1": (MIXED, dict(sliding_window=1)),
    "decode-mha": (dict(DECODE, num_q_heads=2), {}),
    "decode-gqa-window": (DECODE, dict(sliding_window=6)),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_the_numpy_loop(name):
    shape, opts = CASES[name]
    b = make_batch(0, **shape)
    reference = functools.partial(ragged_paged_attention_reference, sm_scale=0.3, **opts)
    got = np.asarray(jax.jit(reference)(*b.args))
    want = numpy_attention(b, sm_scale=0.3, **opts)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not got[b.num_valid :].any()  # padding rows are zero


def test_reference_agrees_with_the_reference_shipped_beside_the_tpu_kernel():
    # jax's own loop reference for the TPU kernel: same layout (K even / V odd heads), same
    # causal offset and window convention.
    b = make_batch(1, **MIXED)
    opts = dict(sm_scale=0.3, sliding_window=4, soft_cap=2.0)
    got = ragged_paged_attention_reference(*b.args, **opts)[: b.num_valid]
    # It loops over sequences in Python: jit it with the lengths as constants, to compile once.
    lens, cu, n = (np.asarray(x) for x in (b.kv_lens, b.cu_q_lens, b.num_seqs))
    shipped = jax.jit(lambda q, kv, pi: ref_ragged_paged_attention(q, kv, lens, pi, cu, n, **opts))
    np.testing.assert_allclose(got, shipped(b.q, b.kv_pages, b.page_indices), atol=1e-5)


def test_write_kv_then_read_back_through_the_page_table():
    page_size, pages_per_seq, hkv, d = 4, 3, 2, 8
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.permutation(8)[:6].reshape(2, pages_per_seq), jnp.int32)
    slots_of = jax.jit(
        lambda lens, cu, t: token_slots(table, *token_positions(lens, cu, jnp.array([2]), t), 4),
        static_argnums=2,
    )
    pages = init_pages(8, page_size, hkv, d, jnp.float32)
    written: dict[int, list[np.ndarray]] = {0: [], 1: []}  # each row: [2, hkv, d] (k, v)
    # A prefill step (5 and 3 rows, then 2 padding rows), then a decode step (1 row each).
    for q_lens, kv_lens, num_tokens in (([5, 3], [5, 3], 10), ([1, 1], [6, 4], 2)):
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        slots = slots_of(jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu), num_tokens)
        k, v = rng.standard_normal((2, num_tokens, hkv, d)).astype(np.float32)
        pages = jax.jit(write_kv, donate_argnums=0)(pages, k, v, slots)
        for s in (0, 1):
            written[s] += [np.stack([k[t], v[t]]) for t in range(cu[s], cu[s + 1])]
    k_all, v_all = (np.asarray(x) for x in split_kv(pages))
    for s, rows in written.items():
        want = np.stack(rows)
        np.testing.assert_array_equal(k_all[table[s]].reshape(-1, hkv, d)[: len(rows)], want[:, 0])
        np.testing.assert_array_equal(v_all[table[s]].reshape(-1, hkv, d)[: len(rows)], want[:, 1])
    # Padding rows wrote nothing: exactly the 6 + 4 written slots are non-zero.
    assert int(np.any(np.asarray(pages) != 0, axis=(2, 3)).sum()) == 10


def test_a_prompt_in_chunks_equals_the_prompt_at_once():
    # Chunked prefill (per chunk: write its K/V, then attend) computes the same rows as one
    # prefill of the whole prompt. Each step is padded to a fixed number of rows.
    rng = np.random.default_rng(3)
    n, page_size, hkv, h, d = 11, 4, 2, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((n, x, d)), jnp.float32) for x in (h, hkv, hkv))
    table = jnp.asarray([rng.permutation(6)[:3]], jnp.int32)
    one = jnp.array([1], jnp.int32)

    @jax.jit
    def step(pages, q, k, v, kv_len, q_len):
        lens, cu = kv_len[None], jnp.stack([0, q_len])
        seq, pos, valid = token_positions(lens, cu, one, q.shape[0])
        pages = write_kv(pages, k, v, token_slots(table, seq, pos, valid, page_size))
        out = paged_attention(q, pages, lens, table, cu, one, sm_scale=0.25, sliding_window=6)
        return pages, out

    def run(chunks: list[int], rows: int) -> np.ndarray:
        pages, outs, done = init_pages(6, page_size, hkv, d, jnp.float32), [], 0
        for c in chunks:
            chunk = [
                jnp.pad(x[done : done + c], ((0, rows - c), (0, 0), (0, 0))) for x in (q, k, v)
            ]
            pages, out = step(pages, *chunk, jnp.int32(done + c), jnp.int32(c))
            outs.append(out[:c])
            done += c
        return np.concatenate(outs)

    np.testing.assert_allclose(run([4, 1, 6], rows=8), run([11], rows=12), atol=1e-6)


def test_choose_impl():
    assert choose_impl("tpu", 128, None) == "tpu"
    assert choose_impl("tpu", 64, None) == "reference"  # the kernel needs 128 | head_dim
    assert choose_impl("gpu", 64, None) == "gpu"
    assert choose_impl("gpu", 64, 4096) == "reference"  # the GPU kernel has no window
    assert choose_impl("cpu", 128, None) == "reference"


@pytest.mark.parametrize("name", ["decode", "mixed-softcap"])
def test_gpu_kernel_in_interpret_mode_matches_the_reference(name):
    shape, opts = {"decode": (DECODE, {}), "mixed-softcap": (MIXED, dict(soft_cap=3.0))}[name]
    b = make_batch(4, **shape)
    got = paged_attention(*b.args, sm_scale=0.3, impl="gpu", **opts)
    want = paged_attention(*b.args, sm_scale=0.3, impl="reference", **opts)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_tpu_kernel_in_interpret_mode_is_blocked_by_jax_0_10_2s_interpreter():
    """Pins why the TPU kernel is not compared to the reference on CPU.

    The kernel reshapes a VMEM ref (`cur_async_copy_kv.wait().reshape(...)`) before its
    strided K/V loads; the TPU interpreter in jax 0.10.2 turns each ref access into a range
    and handles only indexing transforms, so the read fails inside its callback with
    "AttributeError: 'ReshapeTransform' object has no attribute 'indices'". (The generic
    interpret=True interpreter fails too, discharging the kernel's ref stores: "'TypedInt'
    object has no attribute 'shape'".)
    When this test fails, jax's interpreter runs the kernel: compare it to the reference
    as the GPU test does.
    """
    b = make_batch(5, **MIXED, head_dim=128)
    with pytest.raises(
        jax.errors.JaxRuntimeError, match="'ReshapeTransform' object has no attribute 'indices'"
    ):
        jax.block_until_ready(paged_attention(*b.args, sm_scale=0.3, impl="tpu"))


def test_the_reference_needs_memory_linear_in_query_rows():
    # One sequence, kv length fixed at max_len, a prefill chunk of T rows. Temp memory must
    # grow linearly in T (equal steps of T add equal bytes: no [T, T] buffer) and stay within
    # what a row may own: its gathered K/V and its scores and probabilities, a few times over.
    page_size, pages_per_seq, hkv, h, d = 16, 16, 2, 4, 16
    max_len = page_size * pages_per_seq

    def temp_bytes(t: int) -> int:
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
        fn = jax.jit(lambda *a: ragged_paged_attention_reference(*a, sm_scale=0.25))
        compiled = fn.lower(
            f32(t, h, d),
            f32(pages_per_seq, page_size, 2 * hkv, d),
            i32(1),
            i32(1, pages_per_seq),
            i32(2),
            i32(1),
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    sizes = [temp_bytes(t) for t in (64, 128, 192)]
    step1, step2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert abs(step2 - step1) <= 0.05 * step1, sizes
    per_row = 4 * (max_len * 2 * hkv * d + 2 * h * max_len)
    assert sizes[2] <= 3 * 192 * per_row, sizes
