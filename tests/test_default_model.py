"""The real default model: our GGUF path against transformers' own GGUF loader."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.registry import resolve
from engine import cpu_kernels
from engine.kv_cache import init_cache, one_page_per_slot
from engine.loading import load_model
from engine.model import Rows, Transformer
from engine.weights import pack_for_cpu_kernels
from samplers import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from eval_perplexity import perplexity  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side. During "
    "its construction, the Eiffel Tower surpassed the Washington Monument to become the tallest "
    "man-made structure in the world, a title it held for 41 years until the Chrysler Building "
    "in New York City was finished in 1930."
)


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf():
    gguf = resolve("smollm2-135m-instruct").source
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module", params=["xla", "cpu_kernels"])
def apply(ours, request):
    """The forward through XLA's ops, and through engine.cpu_kernels with the weights packed
    as the engine packs them on a CPU (this GGUF's Q4_1 blocks as 4-bit codes, the Q8_0
    embedding as 8-bit ones)."""
    params, packed = ours.params, request.param == "cpu_kernels"
    if packed:
        if not cpu_kernels.available():
            pytest.skip("the CPU kernels need x86-64 with AVX2/FMA and a C++ compiler")
        params = jax.device_put(pack_for_cpu_kernels(params, ours.config))
        for i in (0, 29):  # 320 bytes a block of 32 x 16 weights: 4-bit codes
            assert params[f"layers_{i}"]["mlp"]["gate_up_proj"]["kernel"].shape[-1] == 320
        assert params["lm_head"].shape[-1] == 544  # the Q8_0 embedding: f16 scales, 8-bit codes
    net = Transformer(ours.config, ours.dtype, packed)
    table = one_page_per_slot(1)

    @jax.jit
    def apply(t, pos, c):
        (logits,), c = net.apply({"params": params}, [Rows(t, pos, table)], c)
        return logits, c

    return apply


def greedy(model, apply, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding through the cache, one prefill then a token a step, ending at EOS."""
    cache = init_cache(model.config, 1, 128, jnp.float32)
    padded = np.zeros((1, 64), np.int32)
    padded[0, : len(ids)] = ids
    logits, cache = apply(padded, np.arange(64)[None], cache)
    out = [int(np.argmax(logits[0, len(ids) - 1]))]
    for pos in range(len(ids), len(ids) + steps - 1):
        if out[-1] in model.tokenizer.eos_token_ids:
            break
        logits, cache = apply(np.array([[out[-1]]]), np.array([[pos]]), cache)
        out.append(int(np.argmax(logits[0, 0])))
    return out


def test_logits_match_transformers_gguf_loader(ours, hf, apply):
    ids = ours.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Italy is Rome.")
    padded = np.zeros((1, 64), np.int32)
    padded[0, : len(ids)] = ids
    logits, _ = apply(padded, np.arange(64)[None], init_cache(ours.config, 1, 128, jnp.float32))
    logits = np.asarray(logits)[:, : len(ids)]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-3, rtol=0)
    assert (np.argmax(logits, -1) == np.argmax(expected, -1)).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuations_identical_for_32_tokens(ours, hf, apply, prompt):
    ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2)[
            0, len(ids) :
        ].tolist()
    assert greedy(ours, apply, ids, 32) == ref


def test_perplexity_equals_transformers_within_0_1_percent(ours, hf):
    ids = ours.tokenizer.encode(TEXT, add_special_tokens=False)
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    ref = math.exp(loss)
    got = perplexity(ours, TEXT)
    assert abs(got - ref) / ref < 1e-3, (got, ref)
    assert 1.5 < got < 100  # a real language model on real text


def test_engine_defaults_take_a_7000_token_prompt(hf):
    """The engine's defaults (context = the model's 8192 tokens, a paged cache sized by its
    budget) take a 7,000-token prompt, prefilled in chunks over many pages, and continue it
    with transformers' greedy tokens."""
    from engine.api import Engine

    with Engine.from_pretrained(warmup=False) as engine:
        assert engine.max_context == engine.config.max_position_embeddings == 8192
        ids = (engine.tokenizer.encode(TEXT, add_special_tokens=False) * 80)[:7000]
        [out] = engine.generate([ids], SamplingParams(temperature=0.0), max_tokens=4)
        stats = engine.stats()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=2)
    assert list(out.token_ids) == ref[0, len(ids) :].tolist()
    assert stats["kv_page_size"] * (stats["kv_pages"]) >= 8192
