"""Tokenizer, chat template and incremental detokenizer.

Wraps an HF fast tokenizer read from a folder of tokenizer files (checkpoints/ writes
one for every source, GGUF included), so the model's own chat template renders prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Special tokens that open or close a tool call (Mistral's [TOOL_CALLS] is a control token of
# its tokenizer; Hermes-style templates may add <tool_call> as one): kept in decoded text even
# when special tokens are skipped, since the reply's tool-call parser looks for them.
TOOL_MARKERS = ("[TOOL_CALLS]", "<tool_call>", "</tool_call>")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE symbol → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: Iterable[int] = ()):
        self.hf = hf
        ids = set(eos_token_ids)
        if hf.eos_token_id is not None:
            ids.add(hf.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(ids)

    @classmethod
    def from_dir(cls, path: str | Path, generation_config: dict | None = None) -> Tokenizer:
        eos = (generation_config or {}).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(AutoTokenizer.from_pretrained(str(path)), eos_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        kept = self._kept_markers
        if not (skip_special_tokens and kept and kept.keys() & set(ids)):
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, start = [], 0  # the markers spelled out, the rest decoded as asked
        for i, t in enumerate(ids):
            if t in kept:
                parts += [self.hf.decode(ids[start:i], skip_special_tokens=True), kept[t]]
                start = i + 1
        return "".join([*parts, self.hf.decode(ids[start:], skip_special_tokens=True)])

    @cached_property
    def _kept_markers(self) -> dict[int, str]:
        """Tool-call markers that are special tokens of this tokenizer: id → text."""
        vocab = self.hf.get_vocab()
        special = {t.content for t in self.hf.added_tokens_decoder.values() if t.special}
        return {vocab[m]: m for m in TOOL_MARKERS if m in vocab and m in special}

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template if isinstance(template, str) else None

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        options: dict | None = None,
    ) -> str:
        """The model's own chat template applied to OpenAI-style messages (and function
        tools, for a template that renders them); `options` are variables the template
        reads (Qwen3's enable_thinking, say)."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint")
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(options or {}),
        )

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, options: dict | None = None
    ) -> list[int]:
        # The template already holds the special tokens; don't let encode add a BOS twice.
        text = self.render_chat(messages, tools=tools, options=options)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.all_special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @cached_property
    def _bytes_decoder(self) -> dict[str, int] | None:
        # Byte-level BPE pieces are bytes spelled as printable characters (a space is "Ġ");
        # sentencepiece pieces are text with "▁" for a space and <0xNN> byte fallbacks.
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        return _byte_decoder() if type(decoder).__name__ == "ByteLevel" else None

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes a token contributes (possibly a partial character)."""
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if self.is_special(token_id):
            return piece.encode()
        decoder = self._bytes_decoder
        if decoder is not None:
            return bytes(decoder[c] for c in piece if c in decoder)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is emitted only once it forms whole UTF-8 characters: a token that ends
    mid-character is held until the tokens completing it arrive. Decoding a short
    window (from `prefix` to the end) keeps each step O(1) in the sequence length
    while letting tokenizers that merge spaces across tokens decode correctly.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()
    ):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(context[-6:])  # a little prompt context for spacing
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""
