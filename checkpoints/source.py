"""The one shape every weight source takes: a config dict, tensors under HF names, a tokenizer.

Shared by every format module; it imports none of them (checkpoints.opener picks the format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# What the engine's Llama-family model implements, as HF and as llama.cpp spell them.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)


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
    missing_tokenizer: str | None  # why the source has no tokenizer, or None if it has one
    _read: Callable[[str], np.ndarray] = field(repr=False)
    _write_tokenizer: Callable[[Path], None] = field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor in HF layout ([out, in] for a Linear weight)."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}")
        return self._read(name)

    def require_tokenizer(self) -> None:
        """Raise CheckpointError if the source has no tokenizer. Known at open, so a
        conversion can fail before it reads the first tensor."""
        if self.missing_tokenizer is not None:
            raise CheckpointError(f"{self.source}: {self.missing_tokenizer}")

    def save_tokenizer(self, dst: str | Path) -> None:
        """Write HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat
        template, special_tokens_map.json) into the folder `dst`."""
        self.require_tokenizer()
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        self._write_tokenizer(dst)
