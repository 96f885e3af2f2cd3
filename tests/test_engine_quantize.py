"""XLA's path: fused projections (four weight products a layer) and weight-only int8 / fp8
quantization (engine.quantize), against the float matrices they stand for."""

from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import ModelConfig
from engine.kv_cache import init_cache, one_page_per_slot
from engine.model import Linear, Rows, Transformer
from engine.quantize import FORMATS, dequantized, quantize_layer, quantize_matrix
from engine.weights import fuse_layer
from tests.tiny_config import TINY

CONFIG = {**TINY, "model_type": "llama"}

FP8_RELATIVE = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest
FP8_SUBNORMAL = 2.0**-10  # half of e4m3's subnormal spacing 2^-9, in units of the scale


def element_bound(w: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
    """The largest |w - dequantized(w)| the format allows, per element."""
    if fmt == "int8":
        return np.broadcast_to(scale / 2, w.shape)
    return np.abs(w) * FP8_RELATIVE + scale * FP8_SUBNORMAL


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_weights_within_the_format_bound(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 5, 16)).astype(np.float32)
    w[:, 0, 0] = 0.0  # an all-zero column keeps a finite scale
    w[3, 1, 2] = 40.0  # an outlier sets its column's scale
    q = quantize_matrix(jnp.asarray(w), fmt)
    assert q["kernel"].dtype == FORMATS[fmt][0] and q["kernel"].shape == w.shape
    assert q["scale"].shape == (5, 16)
    scale = np.asarray(q["scale"])
    error = np.abs(np.asarray(dequantized(q)) - w)
    assert (error <= element_bound(w, scale, fmt) * (1 + 1e-6)).all()
    assert error[:, 0, 0].max() == 0.0
    # Each column uses its code range: its absmax maps to the largest code.
    codes = np.abs(np.asarray(q["kernel"]).astype(np.float32))
    np.testing.assert_allclose(codes.max(axis=0)[1:], FORMATS[fmt][1], rtol=1e-6)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_product_equals_the_dequantized_one(fmt, dtype):
    """Linear on codes and scales equals x @ dequantized(w) (up to float32 summation order,
    both formats being exact in bfloat16), and x @ w within the format's bound."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 3, 8)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), dtype)
    q = quantize_matrix(jnp.asarray(w), fmt)
    y = Linear((3, 8), False, dtype).apply({"params": q}, x)
    assert y.shape == (2, 5, 3, 8) and y.dtype == dtype
    x32 = np.asarray(x.astype(jnp.float32))
    want = np.einsum("btd,dkh->btkh", x32, np.asarray(dequantized(q)))
    np.testing.assert_allclose(
        np.asarray(y, np.float32), want, rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-3
    )
    exact = np.einsum("btd,dkh->btkh", x32, w)
    bound = np.einsum("btd,dkh->btkh", np.abs(x32), element_bound(w, np.asarray(q["scale"]), fmt))
    slack = 1e-4 + (np.abs(exact) * 2**-7 if dtype == jnp.bfloat16 else 0)
    assert (np.abs(np.asarray(y, np.float32) - exact) <= bound + slack).all()


def weight_products(fn, params, *args) -> int:
    """dot_generals with an operand computed from `params` alone (a weight, perhaps
    converted or reshaped), counted through nested jaxprs."""
    closed = jax.make_jaxpr(fn)(params, *args)
    n_params = len(jax.tree.leaves(params))

    def count(jaxpr, weights: set) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            from_weights = [not isinstance(v, jcore.Literal) and v in weights for v in eqn.invars]
            if eqn.primitive.name == "dot_general" and any(from_weights):
                total += 1
            for sub in jcore.jaxprs_in_params(eqn.params):
                inner = {iv for iv, w in zip(sub.invars, from_weights, strict=False) if w}
                total += count(sub, inner)
            if from_weights and all(from_weights):
                weights.update(eqn.outvars)
        return total

    return count(closed.jaxpr, set(closed.jaxpr.invars[:n_params]))


@pytest.mark.parametrize("quantize", [None, "int8", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7])
def test_a_layer_is_four_weight_products(quantize, dtype, tokens):
    """q/k/v as one product, gate/up as one, o and down: 4 per layer on XLA's path, decode
    and prefill, quantized or not (the head adds one)."""
    config = ModelConfig.from_hf(CONFIG)
    model = Transformer(config, dtype)
    ids = np.zeros((2, tokens), np.int32)
    rows = Rows(ids, np.tile(np.arange(tokens, dtype=np.int32), (2, 1)), one_page_per_slot(2))
    cache = init_cache(config, 2, 16, dtype)
    params = model.init(jax.random.key(0), [rows], cache)["params"]
    if quantize:
        params = {
            name: quantize_layer(value, quantize) if name.startswith("layers_") else value
            for name, value in params.items()
        }
    n = weight_products(lambda p, c: model.apply({"params": p}, [rows], c), params, cache)
    assert n == 4 * config.num_layers + 1


def test_fused_layer_keeps_each_head_q_k_v_together():
    """fuse_layer's [D, kv_heads, group + 2, head_dim]: KV head j holds query heads
    j*group .. j*group + group - 1, then key head j, then value head j."""
    config = ModelConfig.from_hf(CONFIG)
    d, hd, h, kv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    rng = np.random.default_rng(2)
    mods = {
        n: rng.standard_normal((d, m * hd), np.float32)
        for n, m in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))
    }
    layer = {
        "self_attn": {n: {"kernel": w} for n, w in mods.items()},
        "mlp": {
            "gate_proj": {"kernel": rng.standard_normal((d, 6), np.float32)},
            "up_proj": {"kernel": rng.standard_normal((d, 6), np.float32)},
        },
    }
    fused = fuse_layer(layer, config)
    qkv = np.asarray(fused["self_attn"]["qkv_proj"]["kernel"])
    group = h // kv
    assert qkv.shape == (d, kv, group + 2, hd)
    for j in range(kv):
        for g in range(group):
            np.testing.assert_array_equal(
                qkv[:, j, g], mods["q_proj"][:, (j * group + g) * hd : (j * group + g + 1) * hd]
            )
        np.testing.assert_array_equal(qkv[:, j, group], mods["k_proj"][:, j * hd : (j + 1) * hd])
        np.testing.assert_array_equal(
            qkv[:, j, group + 1], mods["v_proj"][:, j * hd : (j + 1) * hd]
        )
    gate_up = np.asarray(fused["mlp"]["gate_up_proj"]["kernel"])
    np.testing.assert_array_equal(gate_up[:, 0], layer["mlp"]["gate_proj"]["kernel"])
    np.testing.assert_array_equal(gate_up[:, 1], layer["mlp"]["up_proj"]["kernel"])
