"""TPU: jax's Pallas ragged paged attention kernel, used as shipped.

The kernel (jax.experimental.pallas.ops.tpu.ragged_paged_attention) takes exactly the common
layout (layout.py) and the ragged-batch convention (ragged.py), so this wrapper converts
nothing; it reads an fp8 (e4m3) pool itself, given k_scale / v_scale (not run here: see
below). What it adds: the kernel's limits checked up front with a clear error, and block
sizes for interpret mode, where the kernel's tuned table (keyed by TPU generation) has no
entry. Interpret mode runs the kernel on CPU under pltpu.force_tpu_interpret_mode; in jax
0.10.2 that interpreter cannot run this kernel (see tests/test_paged_attention.py).
"""

from __future__ import annotations

import contextlib

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

from engine.fp8 import E4M3

# The kernel merges per-block softmax statistics kept 128 lanes wide into a head_dim wide
# accumulator, which it can only do when 128 divides head_dim (an assert inside the kernel).
LANES = 128


def supports(head_dim: int) -> bool:
    """Whether the kernel can run this head size."""
    return head_dim % LANES == 0


def ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same arguments and result as reference.ragged_paged_attention_reference, except that
    padding rows are left undefined (the kernel never writes them).

    q: [T, num_q_heads, head_dim]; kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim];
    kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1];
    num_seqs: i32[1]. Block sizes default to the kernel's tuned ones on a TPU.
    """
    head_dim = q.shape[-1]
    if not supports(head_dim):
        raise ValueError(f"the TPU kernel needs head_dim a multiple of {LANES}, got {head_dim}")
    if interpret:
        # The tuned table looks up the TPU generation, which a CPU does not have.
        num_kv_pages_per_block = num_kv_pages_per_block or min(page_indices.shape[1], 8)
        num_queries_per_block = num_queries_per_block or min(q.shape[0], 8)
    fp8 = kv_pages.dtype == E4M3
    mode = (
        pltpu.force_tpu_interpret_mode(pltpu.InterpretParams())
        if interpret
        else contextlib.nullcontext()
    )
    with mode:
        return rpa.ragged_paged_attention(
            q,
            kv_pages,
            kv_lens,
            page_indices,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            # The kernel scales whatever it reads; layout.py scales only e4m3 pools.
            k_scale=float(k_scale) if fp8 else None,
            v_scale=float(v_scale) if fp8 else None,
            num_kv_pages_per_block=num_kv_pages_per_block,
            num_queries_per_block=num_queries_per_block,
        )
