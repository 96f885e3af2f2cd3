"""HF model folders: config.json, safetensors weights (single file or sharded), tokenizer files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from checkpoints.source import Checkpoint, CheckpointError

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


def _header(path: Path) -> dict:
    """The safetensors header, after checking the file is long enough to hold every tensor."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (OSError, ValueError, struct.error, AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e!r})") from None
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + length + end})"
        )
    data = 8 + length
    return {name: dict(info, start=data + info["data_offsets"][0]) for name, info in header.items()}


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(p) for p in shards if not p.exists()]
        if absent:
            raise CheckpointError(f"{index}: names shard files that do not exist: {absent}")
        return shards
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors weights are supported)"
    )


# safetensors dtypes a weight may have, as numpy reads them (bfloat16 from ml_dtypes, jax's own).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def _read_rows(path: Path, name: str, info: dict, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor, read straight from the file into one new array."""
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name} has dtype {info['dtype']}; supported: {', '.join(_DTYPES)}"
        )
    shape = info["shape"]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    offset, count = info["start"] + start * row_bytes, (stop - start) * row_bytes
    try:
        raw = np.fromfile(path, np.uint8, count=count, offset=offset)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None
    return raw.view(dtype).reshape(stop - start, *shape[1:])


def _tokenizer_writer(folder: Path, present: list[Path]):
    def write(dst: Path) -> None:
        for src in present:
            shutil.copyfile(src, dst / src.name)
        # Newer transformers keep the template in chat_template.jinja; readers that only
        # look at tokenizer_config.json should still find it.
        template = folder / "chat_template.jinja"
        config_path = dst / "tokenizer_config.json"
        if template.exists() and config_path.exists():
            config = read_json(config_path)
            config.setdefault("chat_template", template.read_text())
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))

    return write


def open_hf(folder: Path) -> Checkpoint:
    """Open an HF model folder. Tensors keep the file's dtype (bfloat16 via ml_dtypes)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no config.json, so not an HF model folder")
    config = read_json(config_path)
    generation_path = folder / "generation_config.json"
    generation_config = read_json(generation_path) if generation_path.exists() else None

    where: dict[str, tuple[Path, dict]] = {}
    for shard in _shard_files(folder):
        for name, info in _header(shard).items():
            where[name] = (shard, info)

    def read(name: str, start: int, stop: int) -> np.ndarray:
        shard, info = where[name]
        return _read_rows(shard, name, info, start, stop)

    tokenizer_files = [folder / n for n in _TOKENIZER_FILES if (folder / n).exists()]
    return Checkpoint(
        config=config,
        generation_config=generation_config,
        tensor_names=list(where),
        shapes={name: tuple(info["shape"]) for name, (_, info) in where.items()},
        source=folder,
        missing_tokenizer=None if tokenizer_files else "no tokenizer files (tokenizer.json, ...)",
        _read=read,
        _write_tokenizer=_tokenizer_writer(folder, tokenizer_files),
    )
