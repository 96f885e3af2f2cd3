"""HF model folders: every tensor read back equals the torch state_dict that wrote it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from checkpoints import CheckpointError, open_checkpoint

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def _llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def _qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)).eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _assert_same_tensors(checkpoint, model):
    state = _state(model)
    names = set(checkpoint.tensor_names)
    tied = model.config.tie_word_embeddings
    assert set(state) - names == ({"lm_head.weight"} if tied else set())
    assert names <= set(state)
    for name in checkpoint.tensor_names:
        got = checkpoint.tensor(name)
        assert got.shape == state[name].shape, name
        np.testing.assert_array_equal(np.asarray(got, np.float32), state[name], err_msg=name)


@pytest.mark.parametrize("make", [_llama, lambda: _llama(tie=True), _qwen2])
def test_single_file_tensors_and_config(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    _assert_same_tensors(checkpoint, model)
    assert checkpoint.config == json.loads((tmp_path / "config.json").read_text())
    assert all(checkpoint.tensor(n).dtype == np.float32 for n in checkpoint.tensor_names)


def test_qwen2_has_qkv_biases(tmp_path):
    _qwen2().save_pretrained(tmp_path)
    names = open_checkpoint(tmp_path).tensor_names
    assert "model.layers.1.self_attn.k_proj.bias" in names


def test_sharded_folder(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _assert_same_tensors(open_checkpoint(tmp_path), model)


def test_bfloat16_folder_keeps_its_dtype(tmp_path):
    model = _llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    _assert_same_tensors(checkpoint, model)


def test_rows_read_alone_equal_the_whole_tensors_rows(tmp_path):
    _llama().to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    checkpoint = open_checkpoint(tmp_path)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        whole = checkpoint.tensor(name)
        np.testing.assert_array_equal(checkpoint.tensor(name, 5, 17), whole[5:17])
    with pytest.raises(CheckpointError, match="rows"):
        checkpoint.tensor("model.norm.weight", 0, TINY["hidden_size"] + 1)


def test_generation_config_is_read(tmp_path):
    _llama().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    assert open_checkpoint(tmp_path).generation_config == {"temperature": 0.7}


def test_save_tokenizer_copies_files_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src, dst = tmp_path / "model", tmp_path / "out"
    _llama().save_pretrained(src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", chat_template=template
    ).save_pretrained(src)

    checkpoint = open_checkpoint(src)
    assert checkpoint.missing_tokenizer is None
    checkpoint.save_tokenizer(dst)
    assert json.loads((dst / "tokenizer_config.json").read_text())["chat_template"] == template
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer("hello world")["input_ids"] == [3, 4]
    assert tokenizer.chat_template == template


def test_folder_without_tokenizer_says_so_at_open(tmp_path):
    _llama().save_pretrained(tmp_path / "model")
    checkpoint = open_checkpoint(tmp_path / "model")
    with pytest.raises(CheckpointError, match="model: no tokenizer files"):
        checkpoint.require_tokenizer()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        checkpoint.save_tokenizer(tmp_path / "out")
    assert not (tmp_path / "out").exists()


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from checkpoints import open_checkpoint, store
from tests.test_checkpoints_gguf_files import hf_tensors, write_gguf

folder, work = sys.argv[1], sys.argv[2]
hf = open_checkpoint(folder)
tree = {n: hf.tensor(n) for n in hf.tensor_names}
store.save(work + "/stored", tree, metadata={})
restored = store.restore(work + "/stored")
assert all(np.array_equal(np.asarray(restored[n]), tree[n]) for n in tree)
gguf = open_checkpoint(write_gguf(work + "/m.gguf", hf_tensors(), tokenizer=True))
assert gguf.tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.float32
gguf.save_tokenizer(work + "/tokenizer")
print("no torch needed")
"""


def test_runtime_needs_no_torch(tmp_path):
    _llama().save_pretrained(tmp_path / "model")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(tmp_path / "model"), str(tmp_path)],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo)),
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no torch needed" in result.stdout
