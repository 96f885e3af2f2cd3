"""Families beyond Llama through the whole engine (load, paged prefill, batched decode): tiny
random Qwen3, Gemma 3, Phi-3, Mixtral and Qwen3-MoE checkpoints (HF folders) decode HF
transformers' greedy tokens on the CPU kernels and on XLA's ops. (tests/test_model_parity.py
holds the logits to HF's.)"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from engine import cpu_kernels
from tests import engine_fixtures as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=F.VOCAB,  # the default model's tokenizer
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,  # not hidden / heads, as in the real configs
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=F.EOS,
    pad_token_id=F.EOS,
)
FAMILIES = {
    # YaRN, as Qwen3 configs extend their context
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1_000_000.0,
                factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # Fused q/k/v and gate/up in the checkpoint, a window of 8
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8)),
    # Two local layers of window 8 (the prompts and outputs cross it) around a global one.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=12,
        ),
    ),
    # 8 experts, top 2: a lone decoding row reads only its picks, a batch every expert
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2),
    ),
    # q/k norms, experts narrower than the one dense layer, top 2 of 4 renormalized
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[2],
        ),
    ),
}


@functools.cache
def build(family: str):
    """(folder, HF model): random weights, norms (q/k norms too) noised off their init."""
    from checkpoints import registry

    config_cls, model_cls, extra = FAMILIES[family]
    folder = F._root() / f"tiny-{family}"
    torch.manual_seed(1)
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    if not (folder / "model.safetensors").exists():
        hf.save_pretrained(folder)
        registry.resolve(registry.DEFAULT_MODEL).open().save_tokenizer(folder)
    return folder, hf


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=F.EOS
    )
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "cpu_kernel",
    [
        pytest.param(True, marks=pytest.mark.skipif(not cpu_kernels.available(), reason="kernels")),
        False,
    ],
)
def test_decodes_hf_greedy_tokens(family, cpu_kernel):
    from engine.api import Engine
    from samplers import SamplingParams

    folder, hf = build(family)
    engine = Engine.from_pretrained(
        str(folder),
        max_slots=4,
        max_len=64,
        page_size=F.PAGE,
        dtype=jnp.float32,
        cpu_kernel=cpu_kernel,
        warmup=False,
    )
    try:
        assert engine.programs.model.packed == cpu_kernel
        prompts = F.prompts(3, seed=8, lo=5, hi=30)  # several pages, one batch
        outs = engine.generate(
            prompts, SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert list(out.token_ids) == hf_greedy(hf, prompt, 12)
    finally:
        engine.close()
