"""Bad input gives a CheckpointError that names the file and the problem."""

import json

import pytest

from checkpoints import CheckpointError, open_checkpoint
from tests.checkpoint_fixtures import tiny_llama


@pytest.fixture
def folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _raises(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as info:
        open_checkpoint(path)
    assert str(path.name) in str(info.value)
    assert info.value.__cause__ is None  # a message, not a chained stack from deep inside


def test_missing_path(tmp_path):
    _raises(tmp_path / "nothing", "no such file or folder")


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    _raises(folder, "no config.json")


def test_corrupt_config(folder):
    (folder / "config.json").write_text("{not json")
    _raises(folder, "cannot read JSON")


def test_unknown_file_kind(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0000")
    _raises(tmp_path / "weights.bin", "not a model source")


def test_truncated_safetensors(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    _raises(folder, "truncated safetensors")


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    _raises(folder, "not a readable safetensors file")


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    _raises(folder, "no model.safetensors")


def test_index_naming_a_missing_shard(folder):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(folder, "do not exist")


def test_unsupported_architecture(folder):
    _edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _raises(folder, "unsupported architecture GPT2LMHeadModel")


def test_more_layers_declared_than_stored(folder):
    _edit_config(folder, num_hidden_layers=4)
    _raises(folder, "declares 4 layers.*model.layers.2")


def test_fewer_layers_declared_than_stored(folder):
    _edit_config(folder, num_hidden_layers=1)
    _raises(folder, "beyond the 1 layers")


def test_shape_mismatch(folder):
    _edit_config(folder, intermediate_size=48)
    _raises(folder, r"gate_proj.weight has shape \(64, 32\), the config implies \(48, 32\)")


def test_missing_config_key(folder):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["hidden_size"]
    path.write_text(json.dumps(config))
    _raises(folder, "config lacks hidden_size")


def test_not_a_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"this is not gguf" * 10)
    _raises(tmp_path / "m.gguf", "not a readable GGUF file")


def test_unknown_tensor_name(folder):
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        open_checkpoint(folder).tensor("nope")


def test_config_without_architectures_falls_back_to_model_type(folder):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["architectures"]
    path.write_text(json.dumps(config))
    assert open_checkpoint(folder).config["model_type"] == "llama"
    _edit_config(folder, model_type="bert")
    _raises(folder, "unsupported architecture model_type='bert'")
