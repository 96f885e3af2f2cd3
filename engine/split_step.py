"""A one-token decode step as two programs, for calls with a grammar-constrained choice: the
model's forward, then the sampling step with the rows' grammar masks.

A constrained row's mask for token N+1 needs token N, which the host reads after the call
that drew it. In one program the device then idles while the host reads the token, advances
the grammar and fills the mask. Split, the forward of step N+1 needs only what is already on
the device (token N is in the decode state), so it is dispatched first, and the host reads
token N and fills mask N+1 while the device runs it; the sampling step follows with the mask
(engine.decoding). Both programs are the fused one's pieces (engine.step.Programs'
forward_rows and advance), so a split step draws exactly what the fused one-step call draws.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from engine.decode_state import DecodeState, StepOutput
from engine.kv_cache import KVCache
from engine.step import Params, Programs


class SplitPrograms:
    """The forward and sampling programs of one-token decode steps, per (kv_len, rows)."""

    def __init__(self, programs: Programs):
        self.p = programs
        cache_out = programs.cache_shardings
        self.forward = jax.jit(
            self._forward,
            static_argnames=("kv_len", "rows"),
            donate_argnums=1,
            **({} if cache_out is None else {"out_shardings": (cache_out, None)}),
        )
        state_out, read = programs.state_shardings, programs.read_sharding
        self.sample = jax.jit(
            self._sample,
            static_argnames=("rows",),
            donate_argnums=0,
            **({} if read is None else {"out_shardings": (state_out, read)}),
        )
        self._pairs: dict[tuple[int, int], tuple[Any, Any]] = {}

    def ready(self, kv_len: int, rows: int) -> bool:
        return (kv_len, rows) in self._pairs

    def pair(
        self, params: Params, cache: KVCache, state: DecodeState, *, kv_len: int, rows: int
    ) -> tuple[Any, Any]:
        """The compiled (forward, sample) for this geometry, compiling them on first use:
        forward(params, cache, state) -> (cache, logits f32[rows, V]), then
        sample(state, logits, masks) -> (state, StepOutput [1, rows, ...]). The arguments may
        be arrays or their jax.ShapeDtypeStructs."""
        key = (kv_len, rows)
        if key not in self._pairs:
            with self.p.on_mesh():
                forward = self.forward.lower(params, cache, state, kv_len=kv_len, rows=rows)
            forward = forward.compile()
            _, logits = jax.eval_shape(
                lambda *a: self._forward(*a, kv_len=kv_len, rows=rows), params, cache, state
            )
            logits = jax.ShapeDtypeStruct(
                logits.shape, logits.dtype, sharding=forward.output_shardings[1]
            )
            masks = self.p.masks_shape(rows)
            sample = self.sample.lower(state, logits, masks, rows=rows).compile()
            self._pairs[key] = (forward, sample)
        return self._pairs[key]

    def _forward(
        self, params: Params, cache: KVCache, state: DecodeState, *, kv_len: int, rows: int
    ) -> tuple[KVCache, jax.Array]:
        head = self.p.order.head(state, rows)
        logits, cache = self.p.forward_rows(params, cache, head, kv_len, [])
        return cache, logits

    def _sample(
        self, state: DecodeState, logits: jax.Array, masks: jax.Array, *, rows: int
    ) -> tuple[DecodeState, StepOutput]:
        order = self.p.order
        head = order.head(state, rows)
        head, out = self.p.advance(head, logits, order.to_rows(masks), head.active)
        out = jax.tree.map(lambda x: jnp.expand_dims(order.to_slots(x), 0), out)
        return order.with_head(state, head), out
