"""Reads and writes of the KV cache through a real page table: pages of 16 positions, handed
out in shuffled order, several sequences of different lengths sharing one pool.

The CPU kernels (decode attention, the decode layer, extend attention) must give bit for bit
what they give on the contiguous layout (one page per sequence), which test_cpu_kernels holds
to the float64 definition; the XLA path's writes and reads must put and find every position
where the table says; and the step programs (prefill, insert, extend, decode) must generate
the same tokens on a real table as on one page per slot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
from engine import cpu_kernels
from engine.config import ModelConfig
from engine.decode_state import DecodeState
from engine.kv_cache import (
    init_cache,
    one_page_per_slot,
    read_pages,
    write_pages,
    write_prefix,
)
from engine.model import Rows, Transformer
from engine.step import Programs
from engine.weights import pack_for_cpu_kernels
from tests.test_cpu_kernels import WEIGHTS
from tests.tiny_config import TINY

RNG = np.random.default_rng(7)
PAGE = 16
kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU kernels need x86-64 with AVX2/FMA and a compiler"
)


@dataclasses.dataclass
class Pool:
    """A shuffled page table over a pool of random pages, and the same sequences laid out
    contiguously ([B, K, pages_per_seq * PAGE, D], what one page per sequence holds)."""

    table: np.ndarray  # i32[B, pages_per_seq]
    keys: np.ndarray  # [num_pages, K, PAGE, D]
    values: np.ndarray
    scratch: int  # the page that pads every table row past the sequence's own pages

    def contiguous(self, pool: np.ndarray) -> np.ndarray:
        pages = np.asarray(pool)[self.table]  # [B, n, K, PAGE, D]
        b, n, k, _, d = pages.shape
        return pages.transpose(0, 2, 1, 3, 4).reshape(b, k, n * PAGE, d)


def make_pool(used: list[int], pages_per_seq: int, kv_heads: int, head_dim: int) -> Pool:
    """Sequence b owns used[b] pages; a pool of those, a scratch page and two spare pages
    nobody owns, in shuffled order."""
    num_pages = sum(used) + 3
    order = RNG.permutation(num_pages).astype(np.int32)
    scratch = int(order[-1])
    table = np.full((len(used), pages_per_seq), scratch, np.int32)
    taken = 0
    for b, n in enumerate(used):
        table[b, :n] = order[taken : taken + n]
        taken += n
    shape = (num_pages, kv_heads, PAGE, head_dim)
    keys = RNG.standard_normal(shape).astype(np.float32)
    values = RNG.standard_normal(shape).astype(np.float32)
    return Pool(table, keys, values, scratch)


def untouched(pool: Pool, before: np.ndarray, after: np.ndarray) -> None:
    """Pages outside every sequence (the scratch page and the spares) are as they were."""
    owned = set(pool.table[:, :].ravel().tolist()) - {pool.scratch}
    for page in set(range(before.shape[0])) - owned:
        np.testing.assert_array_equal(np.asarray(after)[page], before[page])


def rotary(rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    angles = RNG.uniform(0, 6, (rows, dim // 2))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# Positions on both sides of page boundaries, the first of a page, and past the last page
# (112 = 7 pages of 16: nothing written, every position seen).
POSITIONS = np.array([0, 15, 16, 47, 100, 112], np.int32)
PAGES_PER_SEQ = 7


def pages_used(positions: np.ndarray) -> list[int]:
    return [min(int(p) // PAGE + 1, PAGES_PER_SEQ) for p in positions]


@kernels
@pytest.mark.parametrize("head_dim", [64, 68, 80])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_attention_through_a_page_table_equals_the_contiguous_layout(head_dim, window):
    heads, kv_heads, rows = 6, 2, len(POSITIONS)
    pool = make_pool(pages_used(POSITIONS), PAGES_PER_SEQ, kv_heads, head_dim)
    qkv = RNG.standard_normal((rows, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    cos, sin = rotary(rows, head_dim)
    call = jax.jit(cpu_kernels.decode_attention, static_argnums=(7, 8))
    args = (qkv, cos, sin, POSITIONS)
    out, keys, values = call(*args, pool.table, pool.keys, pool.values, heads, window)
    flat_keys, flat_values = pool.contiguous(pool.keys), pool.contiguous(pool.values)
    want_out, want_keys, want_values = call(
        *args, one_page_per_slot(rows), flat_keys, flat_values, heads, window
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(pool.contiguous(keys), np.asarray(want_keys))
    np.testing.assert_array_equal(pool.contiguous(values), np.asarray(want_values))
    untouched(pool, pool.keys, keys)
    untouched(pool, pool.values, values)
    assert not np.array_equal(pool.contiguous(keys), flat_keys)  # it did write


@kernels
@pytest.mark.parametrize("window", [None, 20])
def test_a_row_decoded_alone_gets_the_bits_it_gets_in_a_batch(window):
    """Batch invariance. A lone row has fewer (row, KV head) units than twice the threads,
    so its positions and query heads are spread over the threads (chunks of 64 positions);
    in a batch each unit runs whole on one thread. Scores, sums and the written K/V agree
    bit for bit."""
    heads, kv_heads, head_dim, rows = 6, 2, 64, len(POSITIONS)
    pool = make_pool(pages_used(POSITIONS), PAGES_PER_SEQ, kv_heads, head_dim)
    qkv = RNG.standard_normal((rows, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    cos, sin = rotary(rows, head_dim)
    call = jax.jit(cpu_kernels.decode_attention, static_argnums=(7, 8))
    out, keys, values = call(
        qkv, cos, sin, POSITIONS, pool.table, pool.keys, pool.values, heads, window
    )
    alone_keys, alone_values = pool.keys, pool.values
    for b in range(rows):
        one = slice(b, b + 1)
        alone, alone_keys, alone_values = call(
            qkv[one], cos[one], sin[one], POSITIONS[one], pool.table[one],
            alone_keys, alone_values, heads, window,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(out)[b])
    np.testing.assert_array_equal(np.asarray(alone_keys), np.asarray(keys))
    np.testing.assert_array_equal(np.asarray(alone_values), np.asarray(values))


LAYER = {"d": 64, "heads": 4, "kv_heads": 2, "dim": 16, "inter": 96, "eps": 1e-5}


def layer_weights() -> dict:
    """A Llama layer's packed weights (LAYER's shapes), each matrix in another format."""
    d, heads, kv_heads, dim, inter = (LAYER[k] for k in ("d", "heads", "kv_heads", "dim", "inter"))
    width = (heads + 2 * kv_heads) * dim
    return {
        "input_layernorm": {"weight": RNG.uniform(0.5, 1.5, d).astype(np.float32)},
        "post_attention_layernorm": {"weight": RNG.uniform(0.5, 1.5, d).astype(np.float32)},
        "self_attn": {
            "qkv_proj": {"kernel": cpu_kernels.pack(WEIGHTS["q4_1"](d, width))},
            "o_proj": {"kernel": cpu_kernels.pack(WEIGHTS["q8_0"](heads * dim, d))},
        },
        "mlp": {
            "gate_up_proj": {"kernel": cpu_kernels.pack(WEIGHTS["q4_0"](d, 2 * inter))},
            "down_proj": {"kernel": cpu_kernels.pack(WEIGHTS["bfloat16"](inter, d) * 0.1)},
        },
    }


def layer_inputs() -> tuple:
    """(weights, page pool, x, cos, sin) of a decode layer call over POSITIONS' rows."""
    rows, dim = len(POSITIONS), LAYER["dim"]
    pool = make_pool(pages_used(POSITIONS), PAGES_PER_SEQ, LAYER["kv_heads"], dim)
    x = RNG.standard_normal((rows, LAYER["d"])).astype(np.float32)
    return (layer_weights(), pool, x, *rotary(rows, dim))


@kernels
@pytest.mark.parametrize("window", [None, 20])
def test_decode_layer_through_a_page_table_equals_the_contiguous_layout(window):
    rows, heads, eps = len(POSITIONS), LAYER["heads"], LAYER["eps"]
    weights, pool, x, cos, sin = layer_inputs()
    call = jax.jit(cpu_kernels.decode_layer, static_argnums=(8, 9, 10))
    args = (x, weights, cos, sin, POSITIONS)
    y, keys, values = call(*args, pool.table, pool.keys, pool.values, heads, window, eps)
    want_y, want_keys, want_values = call(
        *args,
        one_page_per_slot(rows),
        pool.contiguous(pool.keys),
        pool.contiguous(pool.values),
        heads,
        window,
        eps,
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    np.testing.assert_array_equal(pool.contiguous(keys), np.asarray(want_keys))
    np.testing.assert_array_equal(pool.contiguous(values), np.asarray(want_values))
    untouched(pool, pool.keys, keys)


@kernels
@pytest.mark.parametrize("valid", [0, 1, 3])
def test_decode_layer_skips_the_rows_from_valid_rows_on(valid):
    """The first `valid` rows come out as from a call on them alone; the rest are zeros and
    write nothing to their pages (a decode program wider than its live rows)."""
    heads, eps = LAYER["heads"], LAYER["eps"]
    weights, pool, x, cos, sin = layer_inputs()
    call = jax.jit(cpu_kernels.decode_layer, static_argnums=(8, 9, 10))
    pools = (pool.keys, pool.values)
    y, *kv = call(x, weights, cos, sin, POSITIONS, pool.table, *pools, heads, None, eps, valid)
    first = slice(0, valid)
    alone_y, *alone_kv = call(
        x[first], weights, cos[first], sin[first], POSITIONS[first], pool.table[first],
        *pools, heads, None, eps,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(y)[:valid], np.asarray(alone_y))
    np.testing.assert_array_equal(np.asarray(y)[valid:], 0.0)
    for got, want in zip(kv, alone_kv, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@kernels
@pytest.mark.parametrize("window", [None, 20])
# From the start, from inside a page, from a page boundary, and running past the last page.
@pytest.mark.parametrize(("start", "valid"), [(0, 21), (9, 30), (32, 17), (100, 21)])
def test_extend_attention_through_a_page_table_equals_the_contiguous_layout(window, start, valid):
    heads, kv_heads, head_dim, new = 6, 2, 64, 32
    # Three sequences share the pool; the middle one is extended.
    pool = make_pool([3, PAGES_PER_SEQ, 5], PAGES_PER_SEQ, kv_heads, head_dim)
    qkv = RNG.standard_normal((1, new, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    cos, sin = rotary(new, head_dim)
    call = jax.jit(cpu_kernels.extend_attention, static_argnums=(8, 9))
    args = (qkv, cos, sin, start, valid)
    out, keys, values = call(*args, pool.table[1], pool.keys, pool.values, heads, window)
    flat_keys, flat_values = pool.contiguous(pool.keys), pool.contiguous(pool.values)
    want_out, want_keys, want_values = call(
        *args, np.array([1]), flat_keys, flat_values, heads, window
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    # The other sequences' pages, the scratch and the spares are untouched too.
    np.testing.assert_array_equal(pool.contiguous(keys), np.asarray(want_keys))
    np.testing.assert_array_equal(pool.contiguous(values), np.asarray(want_values))
    untouched(pool, pool.keys, keys)


@kernels
@pytest.mark.parametrize("window", [None, 20])
def test_extending_several_sequences_in_one_call_equals_extending_each_alone(window):
    """A group of short prompts is one call of several rows, each with its own start, length
    and page-table row: each row's output and K/V are bitwise what it gets alone."""
    heads, kv_heads, head_dim, new = 6, 2, 64, 24
    pool = make_pool([3, PAGES_PER_SEQ, 5], PAGES_PER_SEQ, kv_heads, head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = RNG.standard_normal((3, new, width)).astype(np.float32)
    cos, sin = (np.stack(x) for x in zip(*(rotary(new, head_dim) for _ in range(3)), strict=True))
    starts, valid = np.array([9, 32, 0], np.int32), np.array([24, 5, 17], np.int32)
    call = jax.jit(cpu_kernels.extend_attention, static_argnums=(8, 9))
    out, keys, values = call(
        qkv, cos, sin, starts, valid, pool.table, pool.keys, pool.values, heads, window
    )
    want_keys, want_values, want_out = pool.keys, pool.values, []
    for b in range(3):
        o, want_keys, want_values = call(
            qkv[b : b + 1], cos[b], sin[b], starts[b], valid[b], pool.table[b],
            want_keys, want_values, heads, window,
        )  # fmt: skip
        want_out.append(np.asarray(o)[0])
    np.testing.assert_array_equal(np.asarray(out), np.stack(want_out))
    np.testing.assert_array_equal(np.asarray(keys), np.asarray(want_keys))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    assert not np.asarray(out)[1, 5:].any()  # padding: zeros


@kernels
def test_a_page_id_outside_the_pool_is_an_error_not_a_stray_write():
    heads, kv_heads, head_dim = 2, 1, 16
    pool = make_pool([2], 2, kv_heads, head_dim)
    qkv = np.zeros((1, (heads + 2 * kv_heads) * head_dim), np.float32)
    cos, sin = rotary(1, head_dim)
    table = pool.table.copy()
    table[0, 1] = pool.keys.shape[0]
    with pytest.raises(jax.errors.JaxRuntimeError, match="outside the page pool"):
        jax.block_until_ready(
            cpu_kernels.decode_attention(
                qkv, cos, sin, np.array([3]), table, pool.keys, pool.values, heads, None
            )
        )


def test_xla_writes_and_reads_go_where_the_table_says():
    kv_heads, head_dim, pages_per_seq = 2, 8, 4
    pool = make_pool([1, 4, 4], pages_per_seq, kv_heads, head_dim)
    # Row 0 writes into its one page, row 1 across a page boundary, row 2 partly past its
    # last page (dropped: positions 62, 63 are in the table, 64 and 65 past it).
    positions = np.array([[3, 4, 5, 6], [14, 15, 16, 17], [62, 63, 64, 65]], np.int32)
    new = RNG.standard_normal((3, 4, kv_heads, head_dim)).astype(np.float32)
    written = np.asarray(jax.jit(write_pages)(pool.keys, new, positions, pool.table))
    want = pool.contiguous(pool.keys)
    for b, t in np.ndindex(positions.shape):
        if positions[b, t] < pages_per_seq * PAGE:
            want[b, :, positions[b, t]] = new[b, t]
    np.testing.assert_array_equal(pool.contiguous(written), want)
    untouched(pool, pool.keys, written)
    for kv_len in (5, 16, 40, 64):  # within a page, one page, a partial last page, all
        got = jax.jit(read_pages, static_argnums=(2, 3))(written, pool.table, kv_len, jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), want[:, :, :kv_len])


@pytest.mark.parametrize("length", [5, 16, 40])
def test_a_prefilled_prefix_is_written_into_its_pages(length):
    kv_heads, head_dim = 2, 8
    pool = make_pool([3, 4], 4, kv_heads, head_dim)
    rows = RNG.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32)
    written = np.asarray(jax.jit(write_prefix)(pool.keys, rows, pool.table[1]))
    want = pool.contiguous(pool.keys)
    want[1, :, :length] = rows[0]
    got = pool.contiguous(written)
    np.testing.assert_array_equal(got[:, :, :length], want[:, :, :length])
    np.testing.assert_array_equal(got[0], want[0])  # the other sequence's pages
    untouched(pool, pool.keys, written)


# ---- the step programs on a real page table ---------------------------------------------
CONFIG = {**TINY, "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0}
PROMPTS = [5, 21, 40]  # prompt lengths; the last is prefilled in part and extended
STEPS, MAX_LEN = 3, 64


def generate(config, params, packed: bool, table: np.ndarray, num_pages: int, page_size: int):
    """Greedy tokens and logprobs [STEPS * 4, slots], and each slot's K of layer 0 read back
    through its table row, from prefill + insert (+ extend) + decode on this geometry."""
    programs = Programs(config, jnp.float32, 2, [], table.shape[1], packed=packed)
    cache = init_cache(config, num_pages, page_size, jnp.float32)
    state = DecodeState.empty(table, config.vocab_size, 4)
    prompts = np.random.default_rng(3).integers(0, config.vocab_size, (len(PROMPTS), 48))
    for slot, n in enumerate(PROMPTS):
        ids = prompts[slot, :n]
        head = 16 if slot == 2 else n - 1  # slot 2: its first 16 tokens, then the rest
        tokens = np.zeros((1, 48), np.int32)
        tokens[0, :head] = ids[:head]
        rows, _ = programs.prefill(params, tokens, np.int32(head))
        cache = programs.insert(cache, rows, table[slot])
        if head < n - 1:
            rest = np.zeros((1, 32), np.int32)
            rest[0, : n - 1 - head] = ids[head : n - 1]
            cache = programs.extend(
                params, cache, rest, np.int32([head]), np.int32([n - 1 - head]), table[slot][None]
            )
        row = samplers.make_row(samplers.SamplingParams(temperature=0.0), 97, 4, ids, 0)
        state = programs.start_slot(
            state, np.int32(slot), np.int32(ids[-1]), np.int32(n - 1), 100,
            True, True, row,
        )  # fmt: skip
    tokens, logprobs = [], []
    for _ in range(STEPS):
        free = np.full((3, samplers.mask.words(97)), -1, np.int32)  # no grammar
        steps = np.int32(4)
        cache, state, out = programs.decode(
            params, cache, state, free, steps, k=4, kv_len=64, rows=3
        )
        tokens.append(np.asarray(out.tokens))
        logprobs.append(np.asarray(out.logprob))
    pages = np.asarray(cache[0][0])[table]  # [slots, n, K, page_size, D]
    b, n, k, s, d = pages.shape
    keys = pages.transpose(0, 2, 1, 3, 4).reshape(b, k, n * s, d)
    return np.concatenate(tokens), np.concatenate(logprobs), keys


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=kernels)])
def test_the_step_programs_generate_the_same_on_a_real_page_table(packed):
    config = ModelConfig.from_hf(CONFIG)
    model = Transformer(config)
    probe = np.zeros((1, 1), np.int32)
    cache = init_cache(config, 1, 8, jnp.float32)
    params = model.init(jax.random.key(0), [Rows(probe, probe, probe)], cache)["params"]
    if packed:
        params = jax.device_put(pack_for_cpu_kernels(params, config))
    # Slots 0..2 own 1, 3 and 4 pages of 16 (their prompts and 12 new tokens), shuffled.
    pool = make_pool([1, 3, 4], MAX_LEN // PAGE, 1, 1)
    paged = generate(config, params, packed, pool.table, pool.keys.shape[0], PAGE)
    flat = generate(config, params, packed, one_page_per_slot(3), 3, MAX_LEN)
    np.testing.assert_array_equal(paged[0], flat[0])
    np.testing.assert_allclose(paged[1], flat[1], rtol=0, atol=1e-6)
    for slot, n in enumerate(PROMPTS):  # every position written, prompt and generated
        written = n - 1 + 4 * STEPS
        np.testing.assert_allclose(
            paged[2][slot, :, :written], flat[2][slot, :, :written], rtol=0, atol=1e-6
        )
