"""orbax store: HF folder → save → restore is exact; restores land with the asked shardings."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from checkpoints import CheckpointError, open_checkpoint, store
from tests.checkpoint_fixtures import tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_hf_folder_round_trip_is_exact(hf_folder, tmp_path):
    checkpoint = open_checkpoint(hf_folder)
    tree = {name: checkpoint.tensor(name) for name in checkpoint.tensor_names}
    path = store.save(
        tmp_path / "converted",
        tree,
        metadata={"source": str(hf_folder)},
        config=checkpoint.config,
        generation_config={"temperature": 0.5},
    )
    assert store.is_complete(path)
    restored = store.restore(path)
    assert set(restored) == set(tree)
    for name, want in tree.items():
        got = restored[name]
        assert isinstance(got, jax.Array) and got.dtype == want.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    info = store.load_info(path)
    assert info.config == checkpoint.config
    assert info.generation_config == {"temperature": 0.5}
    assert info.metadata == {"source": str(hf_folder)}
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary left behind


def test_nested_tree_with_abstract_targets_casts(tmp_path):
    tree = {"layers": {"0": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, "b": np.ones(4)}
    store.save(tmp_path / "c", tree, metadata={})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    want = {
        "layers": {"0": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=device)}},
        "b": device,
    }
    got = store.restore(tmp_path / "c", want)
    assert got["layers"]["0"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(got["layers"]["0"]["w"], np.float32), tree["layers"]["0"]["w"]
    )
    assert store.stored_arrays(tmp_path / "c")["b"].shape == (4,)


def test_a_tree_of_functions_is_saved_in_parts_each_array_made_when_written(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_PART_BYTES", 1000)
    made = []

    def leaf(name: str, n: int):
        def make() -> np.ndarray:
            made.append(name)
            return np.full(n, len(made), np.float32)

        return make

    tree = {"a": leaf("a", 300), "m": {"b": leaf("b", 10), "c": leaf("c", 10)}, "d": leaf("d", 5)}
    store.save(tmp_path / "c", tree, metadata={})
    parts = json.loads((tmp_path / "c" / "arrays" / "parts.json").read_text())["parts"]
    # "a" fills a part alone (1200 bytes); the small ones share the next
    assert [[leaf["path"] for leaf in part] for part in parts] == [
        [["a"]],
        [["m", "b"], ["m", "c"], ["d"]],
    ]
    got = store.restore(tmp_path / "c")
    assert made == ["a", "b", "c", "d"]
    assert [float(got["a"][0]), float(got["m"]["c"][0]), float(got["d"][-1])] == [1, 3, 4]
    assert store.stored_arrays(tmp_path / "c")["m"]["b"].shape == (10,)


def test_a_checkpoint_of_an_older_format_is_refused_by_name(tmp_path):
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={})
    marker = tmp_path / "c" / "jaxfire_checkpoint.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 1}))
    assert not store.is_complete(tmp_path / "c")
    with pytest.raises(CheckpointError, match="format 1.*convert its source again"):
        store.restore(tmp_path / "c")
    with pytest.raises(CheckpointError, match="format 1.*convert its source again"):
        open_checkpoint(tmp_path / "c")


def test_lists_are_refused(tmp_path):
    with pytest.raises(TypeError, match="layers: not an array but list"):
        store.save(tmp_path / "c", {"layers": [np.ones(3)]}, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing_complete(tmp_path):
    def crash(_folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={}, write_tokenizer=crash)
    assert not store.is_complete(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="not a complete jaxfire checkpoint"):
        store.restore(tmp_path / "c")


def test_folder_without_marker_is_not_complete(tmp_path):
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={})
    (tmp_path / "c" / "jaxfire_checkpoint.json").unlink()
    assert not store.is_complete(tmp_path / "c")


def test_save_replaces_an_existing_checkpoint(tmp_path):
    store.save(tmp_path / "c", {"w": np.zeros(3)}, metadata={"v": 1})
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={"v": 2})
    np.testing.assert_array_equal(np.asarray(store.restore(tmp_path / "c")["w"]), np.ones(3))
    assert store.load_info(tmp_path / "c").metadata == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_save_without_replace_keeps_a_complete_checkpoint_and_drops_its_own(tmp_path):
    """What the loser of two processes saving one checkpoint at once does."""
    store.save(tmp_path / "c", {"w": np.zeros(3)}, metadata={"v": 1})
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={"v": 2}, replace=False)
    np.testing.assert_array_equal(np.asarray(store.restore(tmp_path / "c")["w"]), np.zeros(3))
    assert store.load_info(tmp_path / "c").metadata == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_save_without_replace_replaces_an_incomplete_folder(tmp_path):
    store.save(tmp_path / "c", {"w": np.zeros(3)}, metadata={"v": 1})
    (tmp_path / "c" / "jaxfire_checkpoint.json").unlink()
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={"v": 2}, replace=False)
    np.testing.assert_array_equal(np.asarray(store.restore(tmp_path / "c")["w"]), np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_a_folder_missing_a_part_is_not_complete(tmp_path):
    """As a host other than process 0 used to leave it under jax.distributed: the marker and
    parts.json written, the arrays not (orbax writes host arrays from process 0 alone)."""
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={})
    shutil.rmtree(tmp_path / "c" / "arrays" / "0")
    assert not store.is_complete(tmp_path / "c")


def test_wrong_shape_or_structure_is_a_checkpoint_error(tmp_path):
    store.save(tmp_path / "c", {"w": np.ones((2, 3))}, metadata={})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(CheckpointError, match="shape"):
        store.restore(
            tmp_path / "c", {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=device)}
        )
    with pytest.raises(CheckpointError, match="do not match"):
        store.restore(tmp_path / "c", {"v": device})


def test_open_checkpoint_on_a_converted_folder_points_to_restore(tmp_path):
    store.save(tmp_path / "c", {"w": np.ones(3)}, metadata={}, config={"architectures": []})
    with pytest.raises(CheckpointError, match="store.restore"):
        open_checkpoint(tmp_path / "c")


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from checkpoints import open_checkpoint, store

    assert jax.device_count() == 8
    checkpoint = open_checkpoint(sys.argv[1])
    tree = {n: checkpoint.tensor(n) for n in checkpoint.tensor_names}
    store.save(sys.argv[2], tree, metadata={})
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def spec(name):
        if name.endswith(("q_proj.weight", "gate_proj.weight", "embed_tokens.weight")):
            return P("model", None)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return P(None, "model")
        if name.endswith("up_proj.weight"):
            return P("data", "model")
        return P()

    wanted = {n: NamedSharding(mesh, spec(n)) for n in tree}
    restored = store.restore(sys.argv[2], wanted)
    for name, array in restored.items():
        assert array.sharding == wanted[name], (name, array.sharding)
        assert len(array.addressable_shards) == 8
        expect = wanted[name].shard_shape(array.shape)
        assert all(s.data.shape == expect for s in array.addressable_shards), name
        np.testing.assert_array_equal(np.asarray(array), tree[name])
    print("sharded restore ok", len(restored))
    """
)


def test_restore_onto_8_simulated_devices(hf_folder, tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(hf_folder), str(tmp_path / "c")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded restore ok" in result.stdout
    marker = json.loads((tmp_path / "c" / "jaxfire_checkpoint.json").read_text())
    assert marker["format"] == store.FORMAT
