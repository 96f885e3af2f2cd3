"""The Flax model against HF transformers' PyTorch models on tiny random configs."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import ConfigError, ModelConfig
from engine.kv_cache import init_cache, one_page_per_slot
from engine.model import Rows, Transformer
from engine.weights import fuse_projections, params_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.tiny_config import TINY  # noqa: E402

HALF = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
LONGROPE = dict(
    pad_token_id=0,
    rope_parameters=dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=list(np.linspace(1.0, 1.5, HALF)),
        long_factor=list(np.linspace(1.0, 6.0, HALF)),
    ),
)
LONGEST = 14  # positions the tests reach: longrope picks its factors by the context

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3-scaled-untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=500000.0,
        ),
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    # q/k/v and gate/up fused in the checkpoint; a sliding window the sequences cross
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=6, pad_token_id=0)),
    # longrope within its original context (short factors) and past it (long factors)
    "phi3-longrope-short": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(LONGROPE, original_max_position_embeddings=16),
    ),
    "phi3-longrope-long": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(LONGROPE, original_max_position_embeddings=4),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # q/k norms (random weights: the norms are noised below); head_dim not hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=8)),
    # Local layers (window 5, crossed by the 11-14 token sequences) and a global one, with
    # their own rope bases; query_pre_attn_scalar apart from head_dim; GeGLU; (1 + w) norms.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
    ),
    # Mixtral: 8 experts, top 2 renormalized, a window the sequences cross
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=6),
    ),
    # Qwen3-MoE: q/k norms, experts narrower than the dense layer, top 3 of 6 not
    # renormalized, the middle of three layers dense (mlp_only_layers)
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=40,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            head_dim=8,
        ),
    ),
    "qwen3_moe-normalized": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True),
    ),
}


def build_pair(case: str):
    cfg_cls, model_cls, extra = CASES[case]
    hf_cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(hf_cfg).eval()
    # Random biases and norm weights, so Qwen2's q/k/v biases and norms are exercised.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = ModelConfig.from_hf(hf_cfg.to_dict()).for_context(LONGEST)
    params = fuse_projections(params_from_hf(saved_tensors(hf), config), config)
    return hf, config, params


def saved_tensors(hf) -> dict[str, np.ndarray]:
    """The model's tensors under the names a checkpoint on disk has (transformers 5 keeps a
    mixture's experts stacked in memory and writes them one by one)."""
    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        return load_file(f"{folder}/model.safetensors")


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_hf(case):
    hf, config, params = build_pair(case)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, size=(3, 11))
    model = Transformer(config)
    cache = init_cache(config, num_pages=3, page_size=32, dtype=jnp.float32)
    positions = np.broadcast_to(np.arange(11), (3, 11))
    block = Rows(ids, positions, one_page_per_slot(3))
    (logits,), _ = model.apply({"params": params}, [block], cache)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stepwise_decode_with_cache_matches_hf(case):
    """Prefill a prompt, then feed one token at a time through the cache; rows sit at
    different positions, as slots of a continuous batch do."""
    hf, config, params = build_pair(case)
    rng = np.random.default_rng(2)
    total = 14
    ids = rng.integers(0, config.vocab_size, size=(2, total))
    expected = hf_logits(hf, ids)
    model = Transformer(config)
    table = one_page_per_slot(2)

    @jax.jit
    def apply(p, t, pos, c):
        (logits,), c = model.apply({"params": p}, [Rows(t, pos, table, kv_len=16)], c)
        return logits, c

    cache = init_cache(config, num_pages=2, page_size=24, dtype=jnp.float32)
    # Row 0 prefills 5 tokens, row 1 prefills 8 (padded with garbage past its length,
    # which must never be seen: it sits beyond every later query's position).
    prompt_lens = [5, 8]
    tokens = np.zeros((2, 8), np.int64)
    positions = np.broadcast_to(np.arange(8), (2, 8)).copy()
    for r, n in enumerate(prompt_lens):
        tokens[r, :n] = ids[r, :n]
        tokens[r, n:] = rng.integers(0, config.vocab_size, 8 - n)
    logits, cache = apply(params, tokens, positions, cache)
    for r, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[r, :n], expected[r, :n], atol=1e-4, rtol=0)
    pos = np.array(prompt_lens)
    while pos.max() < total:
        step_pos = np.minimum(pos, total - 1)
        step_tok = ids[np.arange(2), step_pos][:, None]
        logits, cache = apply(params, step_tok, step_pos[:, None], cache)
        for r in range(2):
            if pos[r] < total:
                np.testing.assert_allclose(logits[r, 0], expected[r, pos[r]], atol=1e-4, rtol=0)
        pos += 1


def test_unsupported_architecture_is_a_typed_error():
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})


def test_shape_mismatch_is_a_typed_error():
    hf, config, _ = build_pair("llama")
    state = saved_tensors(hf)
    wrong = ModelConfig.from_hf({**hf.config.to_dict(), "intermediate_size": 128})
    with pytest.raises(ConfigError, match="gate_proj.weight has shape"):
        params_from_hf(state, wrong)
