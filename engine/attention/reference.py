"""Ragged paged attention in plain jnp: the definition every kernel is tested against.

Each query row gathers its own sequence's pages through the page table and runs a masked
float32 softmax over them. That costs [T, pages_per_seq * page_size] scores and a gathered
copy of the sequence's K/V per row: memory linear in the number of rows T for a fixed
maximum kv length, and no [T, T] buffer even for a long prefill chunk. It is written to be
obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.attention.layout import read_kv
from engine.attention.ragged import token_positions

_EXACT = jax.lax.Precision.HIGHEST


def ragged_paged_attention_reference(
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
) -> jax.Array:
    """Attention of a ragged batch of query rows over a paged KV cache.

    q: [T, num_q_heads, head_dim]; rows laid out as in ragged.py.
    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim] (layout.py); the new rows'
        K/V are already written. An e4m3 pool is read as k_scale * K, v_scale * V (float32).
    kv_lens: i32[S]; page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1];
    num_seqs: i32[1].
    sm_scale: multiplies q.k. soft_cap: logits become soft_cap * tanh(logits / soft_cap).
    sliding_window: a row at position p sees keys in (p - sliding_window, p] (Mistral).
    GQA: q head h reads kv head h // (num_q_heads // num_kv_heads).
    Returns [T, num_q_heads, head_dim] in q's dtype; padding rows are zero.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    if kv_pages.shape[-1] != head_dim or combined % 2 or num_q_heads % num_kv_heads:
        raise ValueError(f"incompatible q {q.shape} and kv_pages {kv_pages.shape}")
    max_len = page_indices.shape[1] * page_size

    seq, pos, valid = token_positions(kv_lens, cu_q_lens, num_seqs, num_tokens)
    # Each row's sequence, read through its page table: [T, max_len, 2 * num_kv_heads, D].
    pages = jnp.take(kv_pages, page_indices[seq], axis=0, mode="clip")
    k, v = read_kv(
        pages.reshape(num_tokens, max_len, combined, head_dim), k_scale, v_scale, jnp.float32
    )

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    # HIGHEST: the definition must not change with a backend's default matmul passes.
    logits = jnp.einsum(
        "tkgd,tlkd->tkgl", qg, k, preferred_element_type=jnp.float32, precision=_EXACT
    )
    logits = logits.astype(jnp.float32) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)

    key = jnp.arange(max_len)[None, :]
    visible = key <= pos[:, None]  # causal; pos < kv_len, so also inside the sequence
    if sliding_window is not None:
        visible &= key > pos[:, None] - sliding_window
    # Padding rows see no key: give them all keys so their softmax stays finite, zero after.
    visible |= ~valid[:, None]
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, v.astype(jnp.float32), precision=_EXACT)
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
