"""Where each query row of a ragged batch sits: its sequence, its position, its cache slot.

A ragged batch is a flat run of T query rows. Sequence s < num_seqs owns rows
cu_q_lens[s] : cu_q_lens[s + 1] (a decode row is one row, a prefill chunk many). Its
kv_lens[s] keys already include those rows' own K/V, so the rows are the last q_len positions:
row j of the sequence sits at position kv_lens[s] - q_len + j. Rows from
cu_q_lens[num_seqs] on are padding; entries of kv_lens / cu_q_lens / page_indices past
num_seqs are ignored, whatever they hold (the shapes stay fixed while the batch varies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_positions(
    kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(seq i32[T], pos i32[T], valid bool[T]) for the T = num_tokens query rows.

    kv_lens: i32[S]; cu_q_lens: i32[S + 1]; num_seqs: i32[1] (the TPU kernel's convention).
    Padding rows get valid False, pos -1 and some in-range seq.
    """
    max_seqs = kv_lens.shape[0]
    n = num_seqs[0]
    # Ends past num_seqs may hold anything; pushing them to the top keeps the table sorted.
    ends = jnp.where(jnp.arange(1, max_seqs + 1) <= n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)  # first s: ends[s] > t
    seq = jnp.minimum(seq, max_seqs - 1)
    valid = t < cu_q_lens[n]
    # Row t is (cu_q_lens[s + 1] - t) rows before the sequence's last key.
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - t)
    return seq, jnp.where(valid, pos, -1), valid


def token_slots(
    page_indices: jax.Array, seq: jax.Array, pos: jax.Array, valid: jax.Array, page_size: int
) -> jax.Array:
    """i32[T]: each row's cache slot (for write_kv), -1 for padding rows.

    page_indices: i32[S, pages_per_seq]; seq, pos, valid: [T] from token_positions.
    """
    safe = jnp.maximum(pos, 0)
    page = page_indices[seq, safe // page_size]
    return jnp.where(valid, page * page_size + safe % page_size, -1)
