"""The KV cache and the decode state are created on their devices with their shardings (under
jit with out_shardings), never built whole on one device and then moved."""

from __future__ import annotations

import jax

from engine import api, decode_state, kv_cache
from engine.api import Engine


def test_cache_and_state_are_only_made_inside_jit(monkeypatch):
    made = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            traced = all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out))
            made.append((fn.__name__, traced))
            return out

        return wrapped

    monkeypatch.setattr(api, "init_cache", spy(kv_cache.init_cache))
    monkeypatch.setattr(
        decode_state.DecodeState, "empty", staticmethod(spy(decode_state.DecodeState.empty))
    )
    with Engine.from_pretrained(warmup=False, max_len=256, kv_cache_memory="64MiB") as engine:
        assert engine.generate(["Hi"], max_tokens=2)[0].token_ids  # the engine works
    assert {name for name, _ in made} == {"init_cache", "empty"}
    assert all(traced for _, traced in made), made
