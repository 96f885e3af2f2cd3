"""Device mesh and partition rules for params, KV cache and decode state.

Mesh axes are ("data", "model"): tensor parallel over "model" (attention heads, MLP
width, vocabulary, a mixture's experts), data parallel over "data" (decode slots and KV
pages, each shard owning its own: engine.data_parallel). A dimension that the axis does
not divide is replicated instead, so any mesh runs any model; XLA inserts the collectives.
On one device every rule degenerates to "replicated".

Multi-host (TPU pod slices): call `engine.lockstep.initialize()` in every host process
before building the mesh (`Engine.from_pretrained(..., distributed=True)` does it); the
mesh then spans all hosts' devices and every host runs the engine loop in lockstep.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class MeshError(ValueError):
    """A mesh this machine's devices cannot form."""


def make_mesh(data: int = 1, model: int = 1, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    if data * model > len(devices):
        raise MeshError(
            f"data parallel {data} x tensor parallel {model} needs {data * model} devices; "
            f"{len(devices)} {jax.default_backend()} device(s) here"
        )
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def _fit(mesh: Mesh, shape: tuple[int, ...], spec: tuple) -> NamedSharding:
    """The spec, with every axis that does not divide its dimension dropped."""
    fitted = [
        axis if axis is not None and dim % mesh.shape[axis] == 0 else None
        for dim, axis in zip(shape, spec, strict=True)
    ]
    return NamedSharding(mesh, P(*fitted))


# Last path component (or the matrix's module name) → spec over its dimensions.
_PARAM_RULES = {
    "embed_tokens": ("model", None),  # [V, D]: vocabulary split
    "lm_head": (None, "model"),  # [D, V]
    # kernels [in, *out]: column-parallel, q/k/v by KV head, gate/up by intermediate column
    "qkv_proj": (None, "model", None, None),  # [D, kv_heads, group + 2, head_dim]
    "gate_up_proj": (None, None, "model"),  # [D, 2, intermediate]
    "o_proj": ("model", None),  # row-parallel
    "down_proj": ("model", None),
}


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A NamedSharding per parameter (arrays or ShapeDtypeStructs), by module name."""

    def rule(path, leaf) -> NamedSharding:
        names = [getattr(k, "key", str(k)) for k in path]
        module = next((n for n in reversed(names) if n in _PARAM_RULES), None)
        spec = _PARAM_RULES.get(module, ())
        if names[-1] in ("bias", "scale"):
            spec = spec[1:]  # a bias or quantization scale follows its output axes
        if "experts" in names:  # [E, ...] (engine.moe): each device holds whole experts
            spec = ("model",)
        spec = tuple(spec)[: leaf.ndim] + (None,) * (leaf.ndim - len(spec))
        return _fit(mesh, leaf.shape, spec)

    return jax.tree_util.tree_map_with_path(rule, params)


def cache_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """KV page pools [num_pages, kv_heads, page_size, head_dim]: pages over data (each shard
    a contiguous block, whose pages only its own sequences take: engine.data_parallel),
    heads over model."""
    return _fit(mesh, shape, ("data", "model", None, None))


def slot_shardings(tree: Any, mesh: Mesh) -> Any:
    """Per-slot state (leading dim = slots) over "data"; everything else replicated."""
    return jax.tree.map(lambda x: _fit(mesh, x.shape, ("data",) + (None,) * (x.ndim - 1)), tree)
