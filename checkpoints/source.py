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
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)


class CheckpointError(Exception):
    """A weight source that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """An opened weight source. Tensors are read lazily, on `tensor(name)`, whole or by rows."""

    config: dict
    generation_config: dict | None
    tensor_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    source: Path
    missing_tokenizer: str | None  # why the source has no tokenizer, or None if it has one
    _read: Callable[[str, int, int], np.ndarray] = field(repr=False)  # (name, start, stop)
    _write_tokenizer: Callable[[Path], None] = field(repr=False)

    def tensor(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The tensor in HF layout ([out, in] for a Linear weight), or its rows [start, stop)
        along the first axis, reading only those: a caller that copies a large tensor block by
        block never holds it twice. Float tensors keep the file's dtype (bfloat16 via
        ml_dtypes); quantized GGUF tensors come dequantized to float32."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}")
        rows = self.shapes[name][0]
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"{self.source}: rows [{start}, {stop}) of {name} ({rows} rows)")
        return self._read(name, start, stop)

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
