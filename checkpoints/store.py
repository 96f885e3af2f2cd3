"""Converted weights on disk: an orbax checkpoint of any pytree, restored sharded.

A stored checkpoint is a folder:
    arrays/                    the orbax checkpoint of the tree
    config.json                the source's HF config (if given)
    generation_config.json     sampling defaults (if given)
    tokenizer files            whatever `write_tokenizer` wrote, so the folder also loads
                               with AutoTokenizer.from_pretrained
    jaxfire_checkpoint.json    caller's metadata; written last, inside a temporary folder that
                               is renamed into place, so its presence means the save finished
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from checkpoints.source import CheckpointError

_ARRAYS = "arrays"
_MARKER = "jaxfire_checkpoint.json"
_FORMAT = 1


@dataclass
class StoredInfo:
    config: dict | None
    generation_config: dict | None
    metadata: dict


def is_complete(path: str | Path) -> bool:
    """True only for a folder that a `save` finished writing."""
    path = Path(path).expanduser()
    return (path / _MARKER).is_file() and (path / _ARRAYS).is_dir()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False))


def save(
    path: str | Path,
    tree: Any,
    *,
    metadata: dict,
    config: dict | None = None,
    generation_config: dict | None = None,
    write_tokenizer: Callable[[Path], None] | None = None,
) -> Path:
    """Save a pytree of arrays (numpy or jax, any sharding) at `path`, replacing what is there.

    Everything is written into a temporary sibling folder first and renamed into place, so an
    interrupted save leaves no folder that `is_complete` accepts. Single-host only.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _ARRAYS, tree)
        if config is not None:
            _write_json(tmp / "config.json", config)
        if generation_config is not None:
            _write_json(tmp / "generation_config.json", generation_config)
        if write_tokenizer is not None:
            write_tokenizer(tmp)
        _write_json(tmp / _MARKER, {"format": _FORMAT, "metadata": metadata})
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _require_complete(path: Path) -> None:
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete jaxfire checkpoint (missing or interrupted)")


def load_info(path: str | Path) -> StoredInfo:
    """The JSON saved beside the arrays."""
    path = Path(path).expanduser().absolute()
    _require_complete(path)

    def read(name: str) -> dict | None:
        file = path / name
        return json.loads(file.read_text()) if file.exists() else None

    return StoredInfo(
        config=read("config.json"),
        generation_config=read("generation_config.json"),
        metadata=read(_MARKER)["metadata"],
    )


def stored_arrays(path: str | Path) -> Any:
    """The stored tree with a jax.ShapeDtypeStruct per array; nothing is read but metadata."""
    path = Path(path).expanduser().absolute()
    _require_complete(path)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path / _ARRAYS).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def restore(path: str | Path, shardings: Any = None) -> Any:
    """Restore the tree saved at `path`.

    `shardings` has the saved tree's structure, a `jax.sharding.Sharding` per array, or a
    `jax.ShapeDtypeStruct` with a sharding (its dtype casts on restore). orbax reads each
    device's shards straight from disk. None: every array on the default device.
    """
    path = Path(path).expanduser().absolute()
    stored = stored_arrays(path)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, stored)

    def target(want, have: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        if isinstance(want, jax.ShapeDtypeStruct):
            if tuple(want.shape) != have.shape:
                raise CheckpointError(
                    f"{path}: asked for shape {tuple(want.shape)}, stored {have.shape}"
                )
            return want
        return jax.ShapeDtypeStruct(have.shape, have.dtype, sharding=want)

    try:
        abstract = jax.tree.map(target, shardings, stored)
    except ValueError as e:  # tree structures differ
        raise CheckpointError(f"{path}: shardings do not match the stored tree ({e})") from None
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / _ARRAYS, abstract)
