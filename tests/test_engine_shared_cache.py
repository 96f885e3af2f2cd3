"""Several processes converting one checkpoint into one cache folder (the hosts of a slice on
a shared filesystem): the first to finish publishes its folder, the others drop theirs and
load the winner's; a folder a killed converter left half-written is never taken as complete.
The converters are plain subprocesses (no jax.distributed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import store
from engine import disk_cache
from engine.loading import load_model
from tests import engine_fixtures as F
from tests.console import cpu_env

pytest.importorskip("torch")  # the tiny model is built with transformers

# argv: the model, a rendezvous folder, this converter's rank and how many there are. Each
# stops in its save, its arrays written and its folder tagged with its rank, until all are
# there; then rank 0 publishes first, the others once its folder is complete. A lone
# converter waits there until it is killed. Prints a digest of the weights it loaded.
_CONVERTER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path

    import jax
    import numpy as np

    from checkpoints import store
    from checkpoints.source import Checkpoint
    from engine import disk_cache
    from engine.loading import load_model

    model, meet, rank, n = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:])
    folder = disk_cache.converted_dir(model.name, model)
    write = Checkpoint.save_tokenizer

    def wait(done):
        deadline = time.monotonic() + 120
        while not done():
            assert time.monotonic() < deadline, "the other converter never came"
            time.sleep(0.01)

    def save_tokenizer(self, dst):
        write(self, dst)  # the last file before the marker
        (Path(dst) / f"converter-{rank}").touch()
        (meet / str(rank)).touch()
        if n == 1:
            time.sleep(600)
        wait(lambda: len(list(meet.iterdir())) == n)
        if rank > 0:
            wait(lambda: store.is_complete(folder))

    Checkpoint.save_tokenizer = save_tokenizer
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(load_model(str(model)).params):
        digest.update(np.asarray(leaf).tobytes())
    print(json.dumps({"digest": digest.hexdigest()}))
    """
)


def converters(cache: Path, meet: Path, n: int) -> list[subprocess.Popen]:
    meet.mkdir()
    argv = [sys.executable, "-c", _CONVERTER, str(F.tiny_model_dir()), str(meet)]
    env = cpu_env(1, JAXFIRE_CACHE_DIR=str(cache))
    return [
        subprocess.Popen(
            [*argv, str(rank), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(n)
    ]


def cache_folder() -> Path:
    """The tiny model's folder in the cache ($JAXFIRE_CACHE_DIR)."""
    model = F.tiny_model_dir()
    return disk_cache.converted_dir(model.name, model)


def test_two_converters_at_once_both_load_the_first_ones_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    digests = []
    for proc in converters(tmp_path / "cache", tmp_path / "meet", 2):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        digests.append(json.loads(out.strip().splitlines()[-1])["digest"])
    assert digests[0] == digests[1]
    folder = cache_folder()
    assert store.is_complete(folder)
    # The first converter's folder, kept: the second dropped its own instead of replacing it.
    assert [p.name for p in folder.glob("converter-*")] == ["converter-0"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no leftovers


def test_a_folder_a_killed_converter_left_is_not_taken_as_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "cache"))
    [proc] = converters(tmp_path / "cache", tmp_path / "meet", 1)
    try:
        deadline = time.monotonic() + 300
        while not any((tmp_path / "meet").iterdir()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = cache_folder()
    [half] = (tmp_path / "cache").glob(f".{folder.name}.partial-*")
    assert not folder.exists()
    # The same half-written folder at the cache folder's own path, as a copy cut short
    # would leave it: its arrays and config are there, its marker is not.
    half.rename(folder)
    assert (folder / "arrays" / "parts.json").is_file() and not store.is_complete(folder)
    loaded = load_model(str(F.tiny_model_dir()))  # converts again, in place of it
    assert store.is_complete(folder)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]
    embed = load_file(F.tiny_model_dir() / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(loaded.params["embed_tokens"]), embed)
