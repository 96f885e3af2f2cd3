"""The one shape every weight source takes: a config dict, tensors under HF names, a tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# What the engine's Llama-family model implements, as HF and as llama.cpp spell them.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CheckpointError(Exception):
    """A weight source that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """An opened weight source. Tensors are read lazily, one at a time, on `tensor(name)`."""

    config: dict
    generation_config: dict | None
    tensor_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    source: Path
    _read: Callable[[str], np.ndarray] = field(repr=False)
    _write_tokenizer: Callable[[Path], None] = field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor in HF layout ([out, in] for a Linear weight)."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}")
        return self._read(name)

    def save_tokenizer(self, dst: str | Path) -> None:
        """Write HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat
        template, special_tokens_map.json) into the folder `dst`."""
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        self._write_tokenizer(dst)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF model folder or a .gguf file; the result is validated against its config."""
    from checkpoints import store
    from checkpoints.validate import validate_tensors

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and store.is_complete(path):
        raise CheckpointError(
            f"{path} is a converted jaxfire checkpoint; restore it with checkpoints.store.restore"
        )
    if path.is_dir():
        from checkpoints.hf import open_hf

        checkpoint = open_hf(path)
    elif path.suffix.lower() == ".gguf":
        from checkpoints.gguf import open_gguf

        checkpoint = open_gguf(path)
    else:
        raise CheckpointError(
            f"{path}: not a model source (expected an HF model folder with config.json "
            "or a .gguf file)"
        )
    validate_tensors(checkpoint)
    return checkpoint
