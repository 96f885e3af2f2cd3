"""jax's Pallas paged decode kernels reading the engine's page pool as it is stored.

The engine keeps K and V apart, per layer [num_pages, kv_heads, page_size, head_dim]
(engine.kv_cache). jax's paged decode kernels (GPU: pallas.ops.gpu.paged_attention, Triton;
TPU: pallas.ops.tpu.paged_attention) read a head-major pool [kv_heads, num_pages, page_size,
head_dim]. Reshaped to [1, num_pages * kv_heads, page_size, head_dim] (the same bytes, no
copy), the engine's pool is such a pool with one KV head, whose page p * kv_heads + h is head
h of page p. So each (query row, KV head) pair becomes one entry of the kernel's batch: that
head's page ids, its group of query heads, and the row's causal length (position + 1). Decode
rows and the rows of a prompt chunk go through the same call; nothing of the size of the
cache is copied or transposed, and no [T, T] scores exist.

What the kernels do not do, the caller keeps on XLA's ops (`choose`): sliding windows (the
kernels mask only past the end), an fp8 pool, the CPU. Under a mesh whose "model" axis splits
the KV heads, the call runs per model shard (a shard_map over "model"), as the partitioner
cannot split a Pallas call itself and would gather the pool onto every device.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_kernel
from jax.experimental.pallas.ops.tpu import paged_attention as tpu_kernel
from jax.sharding import PartitionSpec as P

from engine.attention.gpu import largest_divisor_at_most

Kernel = Literal["gpu", "tpu"]
F32 = jnp.float32
LANES = 128  # a TPU vector register's lanes: head sizes the TPU kernel's page copies tile


def choose(backend: str, window: int | None, pool) -> Kernel | None:
    """The kernel a layer's attention runs on `backend` (jax.default_backend()) over `pool`
    (one of its [num_pages, kv_heads, page_size, head_dim] pools), or None: XLA's ops (a CPU,
    a sliding window, an fp8 pool, a head size the TPU kernel is not known to tile)."""
    if backend not in ("gpu", "tpu") or window is not None:
        return None
    if jnp.dtype(pool.dtype).itemsize < 2:  # fp8: the kernels take per-position scales
        return None
    if backend == "tpu" and pool.shape[-1] % LANES:
        return None
    return backend


def attend_pool(
    kernel: Kernel,
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    positions: jax.Array,
    page_table: jax.Array,
    kv_len: int,
    scale: float,
) -> jax.Array:
    """Each query row attends to positions 0 .. its own of its sequence's pages (their K/V
    already written): q [B, T, kv_heads, group, head_dim], positions i32[B, T],
    page_table i32[B, pages_per_seq], pools [num_pages, kv_heads, page_size, head_dim];
    attends to at most kv_len positions (the engine's bucket). Returns q's shape and dtype.

    A kernel named on another backend runs in Pallas interpret mode (tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    model = 1 if mesh.empty or "model" not in mesh.axis_names else mesh.shape["model"]
    call = lambda *args: _entries(kernel, *args, kv_len=kv_len, scale=scale)  # noqa: E731
    args = (q, k_pool, v_pool, positions, page_table)
    if model == 1:
        return call(*args)
    # The heads split over "model" exactly where the engine splits them (engine.sharding).
    heads = "model" if k_pool.shape[1] % model == 0 else None
    qs, pools = P(None, None, heads), P(None, heads)
    return jax.shard_map(
        call,
        in_specs=(qs, pools, pools, P(), P()),
        out_specs=qs,
        axis_names={"model"},
        check_vma=False,
    )(*args)


def _entries(kernel, q, k_pool, v_pool, positions, page_table, *, kv_len: int, scale: float):
    B, T, K, G, D = q.shape
    num_pages, _, page_size, _ = k_pool.shape
    used = -(-kv_len // page_size)
    # Ids past the pool (padding, another data shard's pages) read its last page instead:
    # the kernels index without bounds checks, and such rows' results are never kept.
    table = jnp.clip(page_table[:, :used], 0, num_pages - 1)
    head_pages = table[:, None, :] * K + jnp.arange(K, dtype=table.dtype)[None, :, None]
    tables = jnp.broadcast_to(head_pages[:, None], (B, T, K, used)).reshape(-1, used)
    # At least one key, so a padding row's softmax stays finite; at most what the table holds.
    lengths = jnp.clip(positions + 1, 1, used * page_size).astype(jnp.int32)
    lengths = jnp.broadcast_to(lengths[:, :, None], (B, T, K)).reshape(-1)
    # Neither kernel scales the logits.
    entries = (q.astype(F32) * scale).astype(q.dtype).reshape(B * T * K, G, D)
    pools = [p.reshape(1, num_pages * K, page_size, D) for p in (k_pool, v_pool)]
    per_block = largest_divisor_at_most(used, 8)
    if kernel == "gpu":
        out = gpu_kernel.paged_attention(
            entries,
            *pools,
            tables,
            lengths,
            pages_per_compute_block=per_block,
            k_splits=largest_divisor_at_most(used // per_block, 16),
            interpret=jax.default_backend() != "gpu",
        )
    else:
        interpret = jax.default_backend() != "tpu"
        mode = (
            pltpu.force_tpu_interpret_mode(pltpu.InterpretParams())
            if interpret
            else contextlib.nullcontext()
        )
        with mode:
            out = tpu_kernel.paged_attention(
                entries, *pools, lengths, tables, pages_per_compute_block=per_block
            )
    return out.reshape(B, T, K, G, D).astype(q.dtype)
