"""open_checkpoint: the format of a weight source, from its path."""

from __future__ import annotations

from pathlib import Path

from checkpoints import store
from checkpoints.gguf import open_gguf
from checkpoints.hf import open_hf
from checkpoints.source import Checkpoint, CheckpointError
from checkpoints.validate import validate_tensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF model folder or a .gguf file; the result is validated against its config."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and store.is_complete(path):
        raise CheckpointError(
            f"{path} is a converted jaxfire checkpoint; restore it with checkpoints.store.restore"
        )
    store.refuse_other_format(path)
    if path.is_dir():
        checkpoint = open_hf(path)
    elif path.suffix.lower() == ".gguf":
        checkpoint = open_gguf(path)
    else:
        raise CheckpointError(
            f"{path}: not a model source (expected an HF model folder with config.json "
            "or a .gguf file)"
        )
    validate_tensors(checkpoint)
    return checkpoint
