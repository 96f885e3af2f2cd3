"""GPU: jax's Pallas (Triton) paged attention kernel, used as shipped, one query row at a time.

jax.experimental.pallas.ops.gpu.paged_attention is a decode kernel: one query row per batch
entry, keys [0, length) through that entry's page table, no causal mask. A ragged batch
becomes such a batch by giving every query row its own entry: row t of sequence s reads s's
page table with length pos(t) + 1, which is exactly its causal prefix. So decode rows and
prefill chunks run through the same kernel, with no [T, T] buffer; the price is that the rows
of a prefill chunk each re-read their sequence's pages (a chunked-prefill kernel would share
them).

Conversions, because the kernel's layout is not the common one (layout.py):
- K and V as separate head-major pools [num_kv_heads, num_pages, page_size, head_dim]: one
  transpose of the whole pool per call. It is the cost of sharing the TPU kernel's layout; a
  GPU-first deployment would store the pool head-major instead.
- the kernel applies no softmax scale: q is scaled by sm_scale before the call.
- an fp8 (e4m3) pool is dequantized to q's dtype within that transpose (one fused copy), as
  the kernel multiplies K and V in q's dtype: fp8 saves the pool's memory here, not the
  per-call copy. (The kernel's own k/v_scales_pages take a scale per position, not per pool.)
- no sliding window: the kernel masks only past the end, so windowed models use the reference.
Padding rows get length 0, and the kernel returns zeros for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as pa

from engine.attention.layout import read_kv
from engine.attention.ragged import token_positions


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    pages_per_compute_block: int | None = None,
    k_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same arguments and result as reference.ragged_paged_attention_reference, without
    sliding_window.

    q: [T, num_q_heads, head_dim]; kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim];
    kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1];
    num_seqs: i32[1]. k_splits splits each row's pages across programs (flash-decoding);
    both block sizes must divide pages_per_seq and default to the largest that do, up to the
    kernel's own defaults (8 and 16).
    """
    pages_per_seq = page_indices.shape[1]
    if pages_per_compute_block is None:
        pages_per_compute_block = largest_divisor_at_most(pages_per_seq, 8)
    if k_splits is None:
        k_splits = largest_divisor_at_most(pages_per_seq // pages_per_compute_block, 16)

    seq, pos, valid = token_positions(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    tables = page_indices[seq]  # [T, pages_per_seq]: each row reads its sequence's pages
    lengths = jnp.where(valid, pos + 1, 0).astype(jnp.int32)  # causal prefix; padding: none

    # [num_pages, page_size, num_kv_heads, head_dim] each
    k, v = read_kv(kv_pages, k_scale, v_scale, q.dtype)
    k_heads = jnp.transpose(k, (2, 0, 1, 3))  # [num_kv_heads, num_pages, page_size, head_dim]
    v_heads = jnp.transpose(v, (2, 0, 1, 3))
    q_scaled = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)
    return pa.paged_attention(
        q_scaled,
        k_heads,
        v_heads,
        tables,
        lengths,
        pages_per_compute_block=pages_per_compute_block,
        k_splits=k_splits,
        interpret=interpret,
        attn_logits_soft_cap=soft_cap,
    )
