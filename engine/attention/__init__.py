"""Paged attention behind one entry point, one implementation per backend.

    paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=...)

kv_pages may be float8 e4m3 with k_scale / v_scale (layout.py); each implementation reads it.

picks, at trace time, jax's Pallas TPU kernel on a TPU, jax's Pallas GPU kernel on a GPU, and
the plain-jnp reference elsewhere or where a kernel does not apply (choose_impl). Every
implementation is held to the reference in tests/test_paged_attention.py. layout.py is the
cache layout and its write, ragged.py the batch convention.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from engine.attention import gpu, tpu
from engine.attention.layout import fuse_kv, init_pages, split_kv, write_kv
from engine.attention.ragged import token_positions, token_slots
from engine.attention.reference import ragged_paged_attention_reference

Impl = Literal["reference", "tpu", "gpu"]

__all__ = [
    "Impl",
    "choose_impl",
    "fuse_kv",
    "init_pages",
    "paged_attention",
    "ragged_paged_attention_reference",
    "split_kv",
    "token_positions",
    "token_slots",
    "write_kv",
]


def choose_impl(backend: str, head_dim: int, sliding_window: int | None) -> Impl:
    """The implementation `paged_attention` runs on `backend` (jax.default_backend())."""
    if backend == "tpu" and tpu.supports(head_dim):
        return "tpu"
    if backend == "gpu" and sliding_window is None:
        return "gpu"
    return "reference"


def paged_attention(
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
    impl: Impl | None = None,
) -> jax.Array:
    """Ragged paged attention; arguments and result as in
    reference.ragged_paged_attention_reference:

    q: [T, num_q_heads, head_dim] -> [T, num_q_heads, head_dim], padding rows zero.
    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]; kv_lens: i32[S];
    page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1]; num_seqs: i32[1].

    impl overrides the choice (tests). A kernel named on a backend it was not written for
    runs in Pallas interpret mode, the only way it runs there.
    """
    backend = jax.default_backend()
    impl = impl or choose_impl(backend, q.shape[-1], sliding_window)
    args = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    opts = dict(sm_scale=sm_scale, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, sliding_window=sliding_window, **opts)
    if impl == "tpu":
        out = tpu.ragged_paged_attention(
            *args, sliding_window=sliding_window, interpret=backend != "tpu", **opts
        )
    elif impl == "gpu":
        if sliding_window is not None:
            raise ValueError("the GPU paged attention kernel has no sliding window")
        out = gpu.ragged_paged_attention(*args, interpret=backend != "gpu", **opts)
    else:
        raise ValueError(f"unknown attention impl {impl!r}")
    # The TPU kernel never writes padding rows; zero them so every impl returns the same.
    _, _, valid = token_positions(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
