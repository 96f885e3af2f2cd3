"""engine.moe: the routed feed-forward against a dense reference written from the definition
(every expert computed for every token, weighted by the router's top-k), for each of its
three dispatches, renormalized or not, float32 and bfloat16, quantized experts too; and a
tiny Mixtral served on 8 simulated devices with its experts split over them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import moe
from engine.config import ModelConfig
from engine.quantize import dequantized, quantize_layer

CONFIG = ModelConfig(
    architecture="MixtralForCausalLM",
    vocab_size=32,
    hidden_size=24,
    intermediate_size=40,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=12,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    attention_bias=False,
    moe_layers=(True,),
    num_experts=8,
    experts_per_token=2,
    moe_intermediate_size=40,
)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return {
        "router": {"kernel": rng.normal(0, 1.0, (d, e)).astype(np.float32)},
        "experts": {
            "gate_up_proj": {"kernel": rng.normal(0, 0.3, (e, d, 2, i)).astype(np.float32)},
            "down_proj": {"kernel": rng.normal(0, 0.3, (e, i, d)).astype(np.float32)},
        },
    }


def reference(x: np.ndarray, params: dict, config: ModelConfig) -> np.ndarray:
    """From the definition, in float64: softmax over all experts, the top k (renormalized if
    the config says), each picked expert's SwiGLU output weighted and summed."""
    x = x.astype(np.float64)
    logits = x @ params["router"]["kernel"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    up = params["experts"]["gate_up_proj"]["kernel"].astype(np.float64)
    down = params["experts"]["down_proj"]["kernel"].astype(np.float64)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        picks = np.argsort(-probs[n], kind="stable")[: config.experts_per_token]
        weights = probs[n, picks]
        if config.norm_topk_prob:
            weights = weights / weights.sum()
        for e, w in zip(picks, weights, strict=True):
            gate, lin = x[n] @ up[e, :, 0], x[n] @ up[e, :, 1]
            out[n] += w * ((gate / (1 + np.exp(-gate)) * lin) @ down[e])
    return out


@pytest.mark.parametrize("how", moe.DISPATCHES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("normalized", [True, False])
def test_dispatch_equals_dense_reference(how, tokens, normalized):
    config = dataclasses.replace(CONFIG, norm_topk_prob=normalized)
    params = random_params(config, seed=tokens)
    x = np.random.default_rng(tokens + 100).normal(size=(tokens, config.hidden_size))
    x = x.astype(np.float32)
    run = jax.jit(lambda x, p: moe.routed_mlp(x, p, config, jax.nn.silu, how))
    got = np.asarray(run(x, params))
    np.testing.assert_allclose(got, reference(x, params, config), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("how", moe.DISPATCHES)
def test_bfloat16_dispatches_agree(how):
    """In bfloat16 every dispatch rounds alike: products accumulate in float32, the
    activation's output is rounded once; all within bfloat16's precision of the reference."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params(CONFIG, 3))
    x = np.random.default_rng(5).normal(size=(12, CONFIG.hidden_size)).astype(np.float32)
    got = moe.routed_mlp(jnp.asarray(x, jnp.bfloat16), params, CONFIG, jax.nn.silu, how)
    assert got.dtype == jnp.bfloat16
    exact = reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), _f32(params), CONFIG)
    scale = np.abs(exact).max()
    assert np.abs(np.asarray(got, np.float32) - exact).max() < 2e-2 * scale


def _f32(tree: dict) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("how", moe.DISPATCHES)
def test_quantized_experts_equal_reference_on_their_dequantized_weights(fmt, how):
    """Each expert gets its own scale per output column; the product with the codes, scaled
    after, is the product with the dequantized experts."""
    params = random_params(CONFIG, 7)
    quantized = quantize_layer({"mlp": params}, fmt)["mlp"]
    experts = quantized["experts"]
    assert experts["gate_up_proj"]["scale"].shape == (8, 2, 40)
    assert experts["down_proj"]["scale"].shape == (8, 24)
    assert quantized["router"] == params["router"]  # the router is not quantized
    plain = {
        "router": params["router"],
        "experts": {
            name: {"kernel": np.asarray(dequantized(m, stacked=True))}
            for name, m in experts.items()
        },
    }
    w = params["experts"]["down_proj"]["kernel"]
    err = np.abs(plain["experts"]["down_proj"]["kernel"] - w)
    bound = np.abs(w).max(axis=1, keepdims=True) / (127 if fmt == "int8" else 16)
    assert (err <= bound).all()  # per expert and column, within the format's bound
    x = np.random.default_rng(9).normal(size=(10, CONFIG.hidden_size)).astype(np.float32)
    got = moe.routed_mlp(x, quantized, CONFIG, jax.nn.silu, how)
    np.testing.assert_allclose(got, reference(x, plain, CONFIG), atol=3e-5, rtol=1e-5)


def test_dispatch_rule():
    """Fewer picks than experts read only the picked ones; otherwise dense on the CPU (whose
    ragged dot is a masked dense product) and grouped on accelerators."""
    assert moe.dispatch(3, CONFIG, "cpu") == "gather"  # 6 picks of 8 experts
    assert moe.dispatch(4, CONFIG, "cpu") == "dense"
    assert moe.dispatch(4, CONFIG, "gpu") == "grouped"
    assert moe.dispatch(64, CONFIG, "tpu") == "grouped"


_SHARDED = textwrap.dedent(
    """
    import json, os, sys
    import jax.numpy as jnp
    from engine.api import Engine
    from engine.sharding import make_mesh
    from samplers import SamplingParams

    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    engine = Engine.from_pretrained(
        folder, max_slots=4, max_len=64, dtype=jnp.float32, mesh=make_mesh(2, 4), warmup=False
    )
    experts = engine.scheduler.params["layers_0"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0), max_tokens=10, ignore_eos=True)
    print(json.dumps({
        "tokens": [list(o.token_ids) for o in outs],
        "spec": [str(a) for a in experts.sharding.spec],
        "shard_shape": list(experts.addressable_shards[0].data.shape),
    }))
    engine.close()
    """
)


def test_experts_sharded_over_eight_devices_give_single_device_tokens():
    """A tiny Mixtral (8 experts) on a (data 2, model 4) mesh of simulated devices: each
    device holds 2 whole experts, and greedy tokens equal HF's (which the single-device
    engine equals in tests/test_model_families.py)."""
    from tests import engine_fixtures as F
    from tests.test_model_families import build, hf_greedy

    folder, hf = build("mixtral")
    prompts = F.prompts(3, seed=4, lo=4, hi=20)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(folder), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["spec"][0] == "model"
    assert result["shard_shape"][0] == 2  # 8 experts over 4 devices
    assert result["tokens"] == [hf_greedy(hf, p, 10) for p in prompts]


def test_mixture_of_experts_gguf_is_refused_by_name(tmp_path):
    """llama.cpp writes Mixtral as a "llama" GGUF with an expert count and stacked experts;
    that is a typed error naming the key, not a missing-tensor puzzle."""
    from checkpoints import CheckpointError, open_checkpoint
    from tests.test_checkpoints_gguf_files import hf_tensors, write_gguf

    path = write_gguf(tmp_path / "mixtral.gguf", hf_tensors(), overrides={"llama.expert_count": 8})
    with pytest.raises(CheckpointError, match=r"llama\.expert_count = 8"):
        open_checkpoint(path)
