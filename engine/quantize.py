"""Weight-only quantization for XLA's path (GPU, TPU): int8 or float8 e4m3 matrices.

Each of a layer's four matrices (engine.model: qkv_proj, o_proj, gate_up_proj, down_proj)
becomes codes of its own shape plus one float32 scale per output column (per-channel,
absmax): w[i, j] ~ code[i, j] * scale[j]. engine.model's Linear multiplies the codes in the
compute dtype (both formats convert exactly to bfloat16) with float32 accumulation and
scales the result, so XLA fuses the conversion into the matrix product and reads one byte
a weight. Embedding and LM head stay in the compute dtype; so do norms and biases.

int8: code = round(w / scale), scale = absmax / 127, so |w - code * scale| <= scale / 2.
fp8: code = e4m3(w / scale), scale = absmax / 448 (e4m3's largest finite), rounded to the
nearest e4m3 value: a relative error of at most 2^-4, or 2^-10 * scale among subnormals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.fp8 import E4M3, E4M3_MAX
from engine.weights import Params

F32 = jnp.float32

# name -> (code dtype, largest code magnitude)
FORMATS = {"int8": (jnp.int8, 127.0), "fp8": (E4M3, E4M3_MAX)}

QUANTIZED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ValueError(f"quantize={name!r}: use one of {', '.join(FORMATS)}")
    return name


def quantize_matrix(kernel: jax.Array, fmt: str, stacked: bool = False) -> dict[str, jax.Array]:
    """A kernel [D, *F] as {"kernel": codes [D, *F], "scale": f32[*F]}; `stacked`: a stack
    of them [E, D, *F] (a mixture's experts), scales f32[E, *F]."""
    dtype, limit = FORMATS[check_format(fmt)]
    w = kernel.astype(F32)
    amax = jnp.max(jnp.abs(w), axis=1 if stacked else 0, keepdims=True)
    scale = jnp.where(amax > 0, amax / limit, 1.0).astype(F32)
    scaled = w / scale
    scale = scale.squeeze(1 if stacked else 0)
    if dtype == jnp.int8:
        codes = jnp.clip(jnp.round(scaled), -limit, limit).astype(dtype)
    else:
        codes = scaled.astype(dtype)
    return {"kernel": codes, "scale": scale}


def dequantized(module: dict[str, jax.Array], stacked: bool = False) -> jax.Array:
    """The float32 kernel a quantized module stands for (`stacked`: a mixture's experts)."""
    scale = module["scale"][:, None] if stacked else module["scale"]
    return module["kernel"].astype(F32) * scale


def quantize_layer(layer: Params, fmt: str, stacked: bool = False) -> Params:
    """One fused layer (engine.weights.fuse_layer) with its four matrices quantized (a routed
    layer's experts each on its own, engine.moe; its router stays as it is)."""
    out = {}
    for name, value in layer.items():
        if name in QUANTIZED:
            out[name] = {**value, **quantize_matrix(value["kernel"], fmt, stacked)}
        elif isinstance(value, dict):
            out[name] = quantize_layer(value, fmt, stacked or name == "experts")
        else:
            out[name] = value
    return out
