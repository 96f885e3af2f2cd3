"""Converted weights on disk: a tree of nested dicts of arrays, saved as orbax checkpoints a
part at a time and restored sharded.

A stored checkpoint is a folder:
    arrays/                    the tree's arrays in parts: 0/, 1/, ... each an orbax checkpoint
                               of the arrays that fill it (or of one larger array), so a tree is
                               saved while it is being built, never held whole
    arrays/parts.json          which leaves each part holds, with their shapes and dtypes
    config.json                the source's HF config (if given)
    generation_config.json     sampling defaults (if given)
    tokenizer files            whatever `write_tokenizer` wrote, so the folder also loads
                               with AutoTokenizer.from_pretrained
    jaxfire_checkpoint.json    the format and the caller's metadata; written last, inside a
                               temporary folder that is renamed into place, so its presence
                               means the save finished

Several processes (hosts sharing a filesystem) may save the same checkpoint at once: each
writes its own temporary folder, and rename() onto a folder that holds files fails (POSIX; NFS
too), so the first to finish wins and, unless told to replace, the others drop their copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from checkpoints.source import CheckpointError

_ARRAYS = "arrays"
_PARTS = "parts.json"
_MARKER = "jaxfire_checkpoint.json"
# 1: one orbax checkpoint of the whole tree. 2: the tree in parts, arrays in their own dtype.
FORMAT = 2
# A part is written once its arrays reach this size: large enough that a model is a few
# hundred parts at most (each costs an orbax call to save and to restore), small enough
# that the arrays waiting for their part are little beside the largest one.
_PART_BYTES = 32 << 20

Tree = Any  # nested dicts with str keys; a leaf is an array or a function returning one


@dataclass
class StoredInfo:
    config: dict | None
    generation_config: dict | None
    metadata: dict


def _stored_format(path: Path) -> int | None:
    """The format a jaxfire checkpoint at `path` was written in; None if it is not one."""
    try:
        return json.loads((path / _MARKER).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def is_complete(path: str | Path) -> bool:
    """True only for a folder that a `save` of this format finished writing."""
    path = Path(path).expanduser()
    if _stored_format(path) != FORMAT:
        return False
    # Every part too: under jax.distributed orbax wrote host arrays from process 0 alone, and
    # the other hosts' conversions left a marker over no arrays (engine.loading now avoids it).
    try:
        parts = json.loads((path / _ARRAYS / _PARTS).read_text())["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((path / _ARRAYS / str(i)).is_dir() for i in range(len(parts)))


def refuse_other_format(path: str | Path) -> None:
    """Raise CheckpointError if `path` holds a jaxfire checkpoint of another format."""
    found = _stored_format(Path(path).expanduser())
    if found not in (None, FORMAT):
        raise CheckpointError(
            f"{path}: a jaxfire checkpoint of format {found}, which this version does not read "
            f"(it reads format {FORMAT}); convert its source again"
        )


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False))


def _flat(tree: Tree) -> dict[tuple[str, ...], Any]:
    """{key path: leaf} of a tree of nested dicts."""
    if not isinstance(tree, Mapping):
        return {(): tree}
    return {(key, *rest): leaf for key, sub in tree.items() for rest, leaf in _flat(sub).items()}


def _nested(flat: dict[tuple[str, ...], Any]) -> Tree:
    tree: dict = {}
    for keys, leaf in flat.items():
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return tree


def _writer() -> ocp.Checkpointer:
    # The arrays are handed over and dropped once written, so orbax need not copy them first
    # (its default), and uncompressed data is written from them as they are: saving a part
    # costs no memory beyond its arrays.
    numpy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy), (jax.Array, ocp.type_handlers.ArrayHandler())
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    return ocp.Checkpointer(handler)


def _save_arrays(folder: Path, tree: Tree) -> None:
    """Each leaf made (if a function), gathered into the current part, and the part written
    once it fills up."""
    folder.mkdir()
    parts: list[list[dict]] = []
    part: dict[tuple[str, ...], np.ndarray | jax.Array] = {}
    with _writer() as writer:

        def write_part() -> None:
            writer.save(folder / str(len(parts)), args=ocp.args.PyTreeSave(_nested(part)))
            parts.append(
                [
                    {"path": list(k), "shape": a.shape, "dtype": a.dtype.name}
                    for k, a in part.items()
                ]
            )
            part.clear()

        for key, leaf in _flat(tree).items():
            # Held by the part alone (no local name), so it is freed once its part is written.
            part[key] = leaf() if callable(leaf) else leaf
            if not isinstance(part[key], np.ndarray | jax.Array):  # e.g. a list: not walked
                raise TypeError(f"{'/'.join(key)}: not an array but {type(part[key]).__name__}")
            if sum(a.nbytes for a in part.values()) >= _PART_BYTES:
                write_part()
        if part:
            write_part()
    _write_json(folder / _PARTS, {"parts": parts})


def save(
    path: str | Path,
    tree: Tree,
    *,
    metadata: dict,
    config: dict | None = None,
    generation_config: dict | None = None,
    write_tokenizer: Callable[[Path], None] | None = None,
    replace: bool = True,
) -> Path:
    """Save a tree of nested dicts at `path`, replacing what is there (with `replace` false, a
    complete checkpoint already there is kept: another process's save of the same tree).

    A leaf is an array (numpy, or jax on this host) or a function that returns one, called
    when its turn comes: its array is written with its part and then dropped, so a tree of
    functions is saved holding one array at a time (and at most _PART_BYTES of small ones).
    Everything is written into a temporary sibling folder first and renamed into place, so an
    interrupted save leaves no folder that `is_complete` accepts. One process of JAX only:
    under jax.distributed orbax writes host arrays from process 0 alone.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        _save_arrays(tmp / _ARRAYS, tree)
        if config is not None:
            _write_json(tmp / "config.json", config)
        if generation_config is not None:
            _write_json(tmp / "generation_config.json", generation_config)
        if write_tokenizer is not None:
            write_tokenizer(tmp)
        _write_json(tmp / _MARKER, {"format": FORMAT, "metadata": metadata})
        _publish(tmp, path, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished folder `tmp` to `path`. The rename fails while a folder with files
    is there: a complete one is kept (unless `replace`) and `tmp` dropped; anything else is
    moved aside and removed, and the rename tried again (another process may publish first)."""
    while True:
        try:
            os.rename(tmp, path)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not replace and is_complete(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        try:
            os.rename(path, old / path.name)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(old, ignore_errors=True)


def _require_complete(path: Path) -> None:
    if is_complete(path):
        return
    refuse_other_format(path)
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


def _parts(path: Path) -> list[list[dict]]:
    _require_complete(path)
    return json.loads((path / _ARRAYS / _PARTS).read_text())["parts"]


def stored_arrays(path: str | Path) -> Tree:
    """The stored tree with a jax.ShapeDtypeStruct per array; nothing is read but metadata."""
    path = Path(path).expanduser().absolute()
    return _nested(
        {
            tuple(leaf["path"]): jax.ShapeDtypeStruct(
                tuple(leaf["shape"]), jnp.dtype(leaf["dtype"])
            )
            for part in _parts(path)
            for leaf in part
        }
    )


def restore(path: str | Path, shardings: Any = None) -> Tree:
    """Restore the tree saved at `path`.

    `shardings` has the saved tree's structure, a `jax.sharding.Sharding` per array, or a
    `jax.ShapeDtypeStruct` with a sharding (its dtype casts on restore). orbax reads each
    device's shards straight from disk, part by part. None: every array on the default device.
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
        abstract = _flat(jax.tree.map(target, shardings, stored))
    except ValueError as e:  # tree structures differ
        raise CheckpointError(f"{path}: shardings do not match the stored tree ({e})") from None
    restored = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for i, part in enumerate(_parts(path)):
            want = _nested({tuple(leaf["path"]): abstract[tuple(leaf["path"])] for leaf in part})
            restored |= _flat(checkpointer.restore(path / _ARRAYS / str(i), want))
    return _nested(restored)
