"""The real default model's GGUF against transformers' own GGUF loader and tokenizer."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from checkpoints import open_checkpoint, registry
from checkpoints.registry import smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def ours(path):
    return open_checkpoint(path)


@pytest.fixture(scope="module")
def reference(path, ours):
    """transformers' parse: its config, and its tensors under HF names (it needs a model only
    to learn the names, so one on the meta device will do)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**ours.config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    parsed["tensors"] = {k: v.float().numpy() for k, v in parsed["tensors"].items()}
    return parsed


def test_every_tensor_matches_transformers(ours, reference):
    tensors = reference["tensors"]
    assert set(ours.tensor_names) == set(tensors)
    for name in ours.tensor_names:
        got = ours.tensor(name)
        assert got.dtype == np.float32 and got.shape == tensors[name].shape, name
        np.testing.assert_allclose(got, tensors[name], rtol=0, atol=1e-6, err_msg=name)


def test_config_matches_transformers(ours, reference):
    theirs, mine = reference["config"], ours.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert mine[key] == theirs[key], key
    assert mine["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)
    assert mine["architectures"] == ["LlamaForCausalLM"] and mine["rope_scaling"] is None


@pytest.fixture(scope="module")
def tokenizers(path, ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    ours.save_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return folder, AutoTokenizer.from_pretrained(folder), theirs


@pytest.mark.parametrize(
    "text",
    ["Hello world!", " leading space, digits 12345", "héllo  wörld\n\n\tcode()", "<|im_start|>hi"],
)
def test_tokenizer_encodes_like_transformers(tokenizers, text):
    _, mine, theirs = tokenizers
    assert mine(text)["input_ids"] == theirs(text)["input_ids"]


def test_tokenizer_files_carry_chat_template_and_specials(tokenizers):
    folder, mine, theirs = tokenizers
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == theirs.chat_template
    assert "<|im_start|>" in config["chat_template"]
    specials = json.loads((folder / "special_tokens_map.json").read_text())
    assert specials["eos_token"] == "<|im_end|>" and specials["bos_token"] == "<|im_start|>"
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert mine.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(
        messages, tokenize=False
    )


def test_registry_generation_config_agrees_with_the_file(ours):
    generation = registry.resolve(registry.DEFAULT_MODEL).generation_config
    assert generation["bos_token_id"] == ours.config["bos_token_id"]
    assert generation["eos_token_id"] == ours.config["eos_token_id"]
