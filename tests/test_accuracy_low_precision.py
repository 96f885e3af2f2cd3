"""The accelerators' default path on this CPU: bfloat16 compute, and int8 / fp8 weights
(engine.quantize), on the real default model against float32 and HF transformers' bf16 model."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from checkpoints.registry import resolve
from engine.api import Engine
from engine.loading import load_model
from samplers import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from eval_perplexity import perplexity  # noqa: E402

pytestmark = pytest.mark.slow
TEXT = (Path(__file__).parent / "data" / "prose.txt").read_text()
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
]
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def ppl():
    """Perplexity of the fixed text per (compute dtype, quantization)."""
    cache = {}

    def get(dtype, quantize=None):
        if (dtype, quantize) not in cache:
            model = load_model(NAME, dtype=dtype, quantize=quantize)
            cache[dtype, quantize] = perplexity(model, TEXT, window=1024)
        return cache[dtype, quantize]

    return get


def test_bf16_perplexity_within_1_percent_of_float32(ppl):
    f32, bf16 = ppl(jnp.float32), ppl(jnp.bfloat16)
    assert 5 < f32 < 100  # a real model on real text
    assert abs(bf16 - f32) / f32 < 0.01, (bf16, f32)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_perplexity_within_2_percent_of_bf16(ppl, fmt):
    bf16, quantized = ppl(jnp.bfloat16), ppl(jnp.bfloat16, fmt)
    assert quantized != bf16  # the weights did change
    assert abs(quantized - bf16) / bf16 < 0.02, (quantized, bf16)


@pytest.fixture(scope="module")
def hf_bf16():
    """transformers' Llama in bfloat16 from the GGUF's float weights (as checkpoints/ reads
    them; tests/test_default_model holds those to transformers' own GGUF loader)."""
    ckpt = resolve(NAME).open()
    config = transformers.LlamaConfig(**ckpt.config)
    model = transformers.LlamaForCausalLM(config)
    state = {name: torch.from_numpy(ckpt.tensor(name).copy()) for name in ckpt.tensor_names}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.to(torch.bfloat16).eval()


def test_bf16_greedy_agrees_with_transformers_bf16_for_16_tokens(hf_bf16):
    with Engine.from_pretrained(NAME, dtype=jnp.bfloat16, warmup=False, max_len=256) as engine:
        assert not engine.programs.model.packed  # XLA's path, as on an accelerator
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        outs = engine.generate(prompts, SamplingParams(temperature=0.0), max_tokens=16)
    eos = engine.tokenizer.eos_token_ids
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf_bf16.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=list(eos)
            )[0, len(ids) :].tolist()
        assert list(out.token_ids) == ref, engine.tokenizer.decode(ids)
