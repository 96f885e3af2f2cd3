"""HF tokenizer files from a GGUF file's vocabulary, merges and chat template.

transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=...)` reads the file with a
torch-only reader, so we read the metadata with the gguf package and hand it to transformers'
GGUF tokenizer builder, which needs only `tokenizers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from checkpoints.source import CheckpointError

# llama.cpp metadata key → the key transformers' GGUF tokenizer builder expects
_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
    # transformers 4.x's builders read the special ids from the same dict
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_SPECIAL = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _convert_gguf_tokenizer():
    try:  # transformers >= 5
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def tokenizer_writer(
    field: Callable[[str], object | None], meta: dict, path: Path
) -> Callable[[Path], None]:
    """A function that writes the file's tokenizer, as HF files, into a folder (the caller
    has checked that the file has a vocabulary). `field(key)` decodes one metadata value
    (None if absent): the vocabulary is decoded only when needed."""

    def write(dst: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        spec = {new: field(old) for old, new in _TOKENIZER_KEYS.items()}
        spec = {key: value for key, value in spec.items() if value is not None}
        try:
            backend, extra = _convert_gguf_tokenizer()(meta["general.architecture"], spec)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot build its tokenizer ({e})") from None

        tokens = spec["tokens"]
        kwargs = {name: tokens[meta[key]] for name, key in _SPECIAL.items() if key in meta}
        # A sentencepiece vocabulary without the flag gets BOS, as llama.cpp does.
        kwargs["add_bos_token"] = meta.get(
            "tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama"
        )
        kwargs["add_eos_token"] = meta.get("tokenizer.ggml.add_eos_token", False)
        template = meta.get("tokenizer.chat_template")
        if template is not None:
            kwargs["chat_template"] = template
        context = meta.get(f"{meta['general.architecture']}.context_length")
        if context:
            kwargs["model_max_length"] = context
        # The file's own special tokens win over what the converter guessed (transformers
        # 5.17's converter names unk_token too, and a repeated keyword is a TypeError).
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{**extra, **kwargs})
        tokenizer.save_pretrained(str(dst))
        special = dst / "special_tokens_map.json"
        if not special.exists():  # transformers 5 no longer writes it
            names = {name: kwargs[name] for name in _SPECIAL if name in kwargs}
            special.write_text(json.dumps(names, indent=2, ensure_ascii=False))

        # Newer transformers write the template to chat_template.jinja only; keep it in
        # tokenizer_config.json too, where every reader looks.
        if template is not None:
            config_path = dst / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config["chat_template"] = template
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))

    return write
