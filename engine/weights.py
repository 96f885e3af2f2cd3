"""HF tensor names → the engine's Flax parameter tree.

checkpoints/ yields tensors under HF names in HF layout ([out, in] for Linear); this is
the one place that layout becomes the engine's ([in, out] kernels, HF module names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import jax.numpy as jnp
import numpy as np

from engine import cpu_kernels
from engine.config import ConfigError, ModelConfig

Params = dict
# Rows copied at a time (counted as float32): a tensor is built block by block into its own
# array, so building one never holds it twice (HF's [out, in] and its transpose, say).
_BLOCK_BYTES = 16 << 20


class Source(Protocol):
    """HF-named tensors with their shapes, read whole or by rows (a checkpoints.Checkpoint)."""

    shapes: Mapping[str, tuple[int, ...]]

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...


@dataclass
class _Arrays:
    """A dict of arrays as a Source."""

    arrays: Mapping[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = {name: np.shape(a) for name, a in self.arrays.items()}

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.arrays[name])[start:stop]


def _copy(
    source: Source, name: str, shape: tuple[int, ...], dtype: np.dtype | None, transpose: bool
) -> np.ndarray:
    """Tensor `name`, transposed if asked, in `dtype` (None: the tensor's own), copied from
    the source block by block."""
    if name not in source.shapes:
        raise ConfigError(f"no tensor {name}, which the config implies")
    if tuple(source.shapes[name]) != shape:
        raise ConfigError(f"tensor {name} has shape {source.shapes[name]}, config implies {shape}")
    step = max(1, _BLOCK_BYTES // (4 * int(np.prod(shape[1:], dtype=np.int64))))
    out = None
    for start in range(0, shape[0], step):
        block = source.tensor(name, start, min(start + step, shape[0]))
        if out is None:
            out = np.empty(shape[::-1] if transpose else shape, dtype or block.dtype)
        if transpose:
            out[:, start : start + len(block)] = block.T
        else:
            out[start : start + len(block)] = block
    return out


def lazy_params_from_hf(source: Source, config: ModelConfig, dtype: jnp.dtype | None) -> Params:
    """The parameter tree with, at each leaf, a function that builds that array.

    Norm weights are float32 (they scale float32 activations); matrices and biases take
    `dtype`, or keep the source's own when it is None. A caller that builds one leaf at a
    time (checkpoints.store.save) holds about one tensor at a time."""
    np_dtype = None if dtype is None else np.dtype(dtype)
    if config.family == "phi3":
        source = _unfused(source, config)

    def matrix(name: str, shape: tuple[int, ...], transpose: bool = False) -> Callable:
        return lambda: _copy(source, name, shape, np_dtype, transpose)

    def linear(name: str, n_in: int, n_out: int, bias: bool = False) -> dict:
        out = {"kernel": matrix(f"{name}.weight", (n_out, n_in), transpose=True)}
        if bias:
            out["bias"] = matrix(f"{name}.bias", (n_out,))
        return out

    # Gemma's RMSNorm scales by 1 + weight: the 1 is added here, in float32 as HF does.
    offset = np.float32(1.0 if config.sandwich_norms else 0.0)

    def norm(name: str, size: int = config.hidden_size) -> dict:
        def make() -> np.ndarray:
            weight = _copy(source, f"{name}.weight", (size,), np.dtype(np.float32), False)
            weight += offset
            return weight

        return {"weight": make}

    def head_norm(name: str) -> dict:
        return norm(name, config.head_dim)

    d, hd = config.hidden_size, config.head_dim
    q_out, kv_out, inter = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    bias = config.attention_bias
    params: Params = {
        "embed_tokens": matrix("model.embed_tokens.weight", (config.vocab_size, d)),
        "norm": norm("model.norm"),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        params[f"layers_{i}"] = {
            "input_layernorm": norm(f"{p}.input_layernorm"),
            "post_attention_layernorm": norm(f"{p}.post_attention_layernorm"),
            **(
                {
                    "pre_feedforward_layernorm": norm(f"{p}.pre_feedforward_layernorm"),
                    "post_feedforward_layernorm": norm(f"{p}.post_feedforward_layernorm"),
                }
                if config.sandwich_norms
                else {}
            ),
            "self_attn": {
                **(
                    {
                        "q_norm": head_norm(f"{p}.self_attn.q_norm"),
                        "k_norm": head_norm(f"{p}.self_attn.k_norm"),
                    }
                    if config.qk_norm
                    else {}
                ),
                "q_proj": linear(f"{p}.self_attn.q_proj", d, q_out, bias),
                "k_proj": linear(f"{p}.self_attn.k_proj", d, kv_out, bias),
                "v_proj": linear(f"{p}.self_attn.v_proj", d, kv_out, bias),
                "o_proj": linear(f"{p}.self_attn.o_proj", q_out, d),
            },
            "mlp": (
                _routed(source, config, p, matrix, np_dtype)
                if config.moe(i)
                else {
                    "gate_proj": linear(f"{p}.mlp.gate_proj", d, inter),
                    "up_proj": linear(f"{p}.mlp.up_proj", d, inter),
                    "down_proj": linear(f"{p}.mlp.down_proj", inter, d),
                }
            ),
        }
    if not config.tie_word_embeddings:
        params["lm_head"] = matrix("lm_head.weight", (config.vocab_size, d), transpose=True)
    return params


# HF's names of a routed layer's router and of expert j's gate, up and down matrices.
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.w{}", (1, 3, 2)),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{}.{}_proj", ("gate", "up", "down")),
}


def _routed(
    source: Source, config: ModelConfig, prefix: str, matrix: Callable, dtype: np.dtype | None
) -> dict:
    """A routed layer's feed-forward (engine.moe): the router [D, E] and every expert's
    matrices stacked, gate/up [E, D, 2, I] and down [E, I, D], built expert by expert."""
    router, expert, (gate, up, down) = _EXPERT_NAMES[config.family]
    e, d, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size

    def stacked(parts: tuple, shape: tuple[int, ...]) -> Callable:
        def make() -> np.ndarray:
            out = None
            for j in range(e):
                for k, part in enumerate(parts):
                    name = f"{prefix}.{expert.format(j, part)}.weight"
                    rows = (d, inter) if part == down else (inter, d)
                    block = _copy(source, name, rows, dtype, transpose=True)
                    if out is None:
                        out = np.empty(shape, block.dtype)
                    if len(parts) > 1:
                        out[j, :, k, :] = block
                    else:
                        out[j] = block
            return out

        return make

    return {
        "router": {"kernel": matrix(f"{prefix}.{router}.weight", (e, d), transpose=True)},
        "experts": {
            "gate_up_proj": {"kernel": stacked((gate, up), (e, d, 2, inter))},
            "down_proj": {"kernel": stacked((down,), (e, inter, d))},
        },
    }


def _made(tree: Params) -> Params:
    """Every leaf built, in the tree's order (so a wrong shape is found where it was before)."""
    return {k: _made(v) if isinstance(v, dict) else v() for k, v in tree.items()}


def params_from_hf(
    source: Source | Mapping[str, np.ndarray],
    config: ModelConfig,
    dtype: jnp.dtype | None = jnp.float32,
) -> Params:
    """The parameter tree, built now, from a Source or a dict of HF-named arrays.

    Norm weights stay float32; matrices take `dtype` (None: their own). Returns numpy
    arrays so the caller decides placement (device_put with shardings)."""
    if isinstance(source, Mapping):
        source = _Arrays(source)
    return _made(lazy_params_from_hf(source, config, dtype))


# Phi-3's checkpoints hold q/k/v and gate/up fused, as [q; k; v] and [gate; up] rows.
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@dataclass
class _Parts:
    """A Source with row ranges of another's tensors under names of their own."""

    source: Source
    parts: dict[str, tuple[str, int]]  # name → (the source's tensor, its first row)
    shapes: dict[str, tuple[int, ...]]

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        if name not in self.parts:
            return self.source.tensor(name, start, stop)
        whole, first = self.parts[name]
        stop = self.shapes[name][0] if stop is None else stop
        return self.source.tensor(whole, first + start, first + stop)


def _unfused(source: Source, config: ModelConfig) -> Source:
    """`source` with each part of a fused matrix under the name Llama gives it."""
    q, kv, inter = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [inter, inter]}
    parts, shapes = {}, dict(source.shapes)
    for name, shape in source.shapes.items():
        pieces = name.rsplit(".", 2)
        if len(pieces) < 3 or pieces[1] not in sizes:
            continue
        prefix, fused, kind = pieces
        bounds = np.cumsum([0, *sizes[fused]])
        if shape[0] != bounds[-1]:
            raise ConfigError(f"{name} has {shape[0]} rows, not {bounds[-1]}")
        for module, (whole, i) in _FUSED_PARTS.items():
            if whole == fused:
                parts[f"{prefix}.{module}.{kind}"] = (name, int(bounds[i]))
                shapes[f"{prefix}.{module}.{kind}"] = (sizes[fused][i], *shape[1:])
    return _Parts(source, parts, shapes)


# Matrices that read the same input, fused into one (engine.model): one product instead of
# three or two. For XLA's ops the parts stay on their own axes ([D, kv_heads, group + 2,
# head_dim] and [D, 2, intermediate]) so tensor parallelism splits each head's q, k and v
# alike; the CPU kernels take them side by side ([D, q | k | v]), each call costing a few
# microseconds of its own. A packed matrix takes the roomiest format any of its parts needs
# (all Q4_1 in the default GGUF; a mixed K-quant file may put a part in 8 bits, or in bf16
# where no grid fits).
FUSED = {
    "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}


def fuse_layer(layer: Params, config: ModelConfig) -> Params:
    """One layer's q/k/v and gate/up matrices (and biases) as XLA's fused ones."""
    heads, kv_heads, hd = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads

    def qkv(q, k, v):  # [..., H*hd], [..., KV*hd] x2 -> [..., KV, group + 2, hd]
        lead = q.shape[:-1]
        q = q.reshape(*lead, kv_heads, group, hd)
        k, v = (t.reshape(*lead, kv_heads, 1, hd) for t in (k, v))
        return jnp.concatenate([q, k, v], axis=-2)

    def gate_up(gate, up):  # [..., I] x2 -> [..., 2, I]
        return jnp.stack([gate, up], axis=-2)

    join = {"qkv_proj": qkv, "gate_up_proj": gate_up}
    out = dict(layer)
    for block, (fused, names) in FUSED.items():
        mods = layer[block]
        if names[0] not in mods:  # a routed layer's experts come stacked (engine.moe)
            continue
        out[block] = {n: m for n, m in mods.items() if n not in names}
        parts = [mods[n] for n in names]
        out[block][fused] = {key: join[fused](*(p[key] for p in parts)) for key in parts[0]}
    return out


def fuse_projections(params: Params, config: ModelConfig) -> Params:
    """params_from_hf's tree with every layer fused (fuse_layer): what engine.model reads."""
    fused = dict(params)
    for i in range(config.num_layers):
        fused[f"layers_{i}"] = fuse_layer(params[f"layers_{i}"], config)
    return fused


def _side_by_side(fused: str, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """A fused kernel [D, *parts] (or bias [*parts]) as the CPU kernels' [D, q | k | v]
    (or [gate | up]) columns."""
    if fused == "gate_up_proj":
        return value.reshape(*value.shape[:-2], -1)
    group = config.num_heads // config.num_kv_heads
    lead = value.shape[:-3]
    q = value[..., :group, :].reshape(*lead, -1)
    k, v = (value[..., group + i, :].reshape(*lead, -1) for i in (0, 1))
    return np.concatenate([q, k, v], axis=-1)


def pack_for_cpu_kernels(params: Params, config: ModelConfig) -> Params:
    """Every linear kernel of a fused tree (fuse_projections) and the LM head as cpu_kernels
    panels (engine.model's `packed`), q/k/v and gate/up side by side.

    A tied head is the packed embedding, which the token lookup reads too
    (cpu_kernels.embedding): the float32 embedding is dropped."""

    def linear(module: dict, fused: str | None = None) -> dict:
        side = (lambda a: _side_by_side(fused, np.asarray(a), config)) if fused else np.asarray
        out = {"kernel": cpu_kernels.pack(side(module["kernel"]))}
        if "bias" in module:
            out["bias"] = side(module["bias"])
        return out

    packed = dict(params)
    fused_names = {fused for fused, _ in FUSED.values()}
    for i in range(config.num_layers):
        layer = dict(params[f"layers_{i}"])
        for block in FUSED:
            if "experts" in layer[block]:  # routed: its experts run on XLA's ops
                continue
            layer[block] = {
                n: m if n.endswith("_norm") else linear(m, n if n in fused_names else None)
                for n, m in layer[block].items()
            }
        packed[f"layers_{i}"] = layer
    if config.tie_word_embeddings:
        packed["lm_head"] = cpu_kernels.pack(np.asarray(packed.pop("embed_tokens")).T)
    else:
        packed["lm_head"] = cpu_kernels.pack(np.asarray(params["lm_head"]))
    return packed
