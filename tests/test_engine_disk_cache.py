"""The cache folder rule, and the folder a converted checkpoint is cached in."""

from pathlib import Path

from engine import disk_cache


def test_cache_root_honours_jaxfire_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert disk_cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("JAXFIRE_CACHE_DIR")
    assert disk_cache.cache_root() == tmp_path / "xdg" / "jaxfire"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert disk_cache.cache_root() == Path.home() / ".cache" / "jaxfire"


def test_a_changed_or_different_source_gets_a_new_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"one")
    first = disk_cache.converted_dir("tiny", source)
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny-")
    assert disk_cache.converted_dir("tiny", source) == first
    source.write_bytes(b"three")
    assert disk_cache.converted_dir("tiny", source) != first
    other = tmp_path / "other.gguf"
    other.write_bytes(b"one")
    assert disk_cache.converted_dir("tiny", other) != first


def test_each_dtype_gets_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"one")
    auto = disk_cache.converted_dir("tiny", source)
    assert auto == disk_cache.converted_dir("tiny", source, "auto")
    assert auto.name.startswith("tiny-auto-")
    assert disk_cache.converted_dir("tiny", source, "bfloat16").name.startswith("tiny-bfloat16-")
