"""Logprobs as the client asked for them: the chat format (`content` entries with
top_logprobs lists) or the legacy completions format (parallel arrays), docs/sampling.md
4.2-4.3, with each token's character offset in the returned text."""

from __future__ import annotations

import codecs
import functools
import math

from engine.requests import ChatTokenizer, TokenLogprob

NEG_INF_LOGPROB = -9999.0  # how -inf is written in JSON (OpenAI / vLLM convention)


def json_logprob(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else NEG_INF_LOGPROB


class TextOffsets:
    """Character offsets of tokens in the returned text (text_offset)."""

    def __init__(self) -> None:
        self.chars = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(raw))
        return at


class LogprobRenderer:
    """Token strings / bytes (cached per token id) and the two logprobs formats."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tok = tokenizer
        self.info = functools.lru_cache(maxsize=1 << 16)(self._info)

    def _info(self, token_id: int) -> tuple[str, list[int], bool]:
        try:
            raw = self.tok.token_bytes(token_id)
        except Exception:  # noqa: BLE001 - an id outside the tokenizer (padded vocabulary)
            raw = b""
        try:
            special = bool(self.tok.is_special(token_id))
        except Exception:  # noqa: BLE001 - same
            special = False
        return raw.decode("utf-8", "replace"), list(raw), special

    def _advance(self, offsets: TextOffsets, token_id: int, in_text: bool) -> int:
        text, raw, special = self.info(token_id)
        return offsets.next(bytes(raw) if in_text or not special else b"")

    def new(self, lps: list[TokenLogprob], offsets: TextOffsets, echo: bool = False) -> list[dict]:
        out = []
        for t in lps:
            text, raw, _ = self.info(t.token_id)
            top = []
            for i, v in t.top:
                alt_text, alt_raw, _ = self.info(i)
                top.append(
                    {"token": alt_text, "logprob": json_logprob(v), "token_id": i, "bytes": alt_raw}
                )
            out.append(
                {
                    "token": text,
                    "logprob": json_logprob(t.logprob),
                    "sampling_logprob": json_logprob(t.sampling_logprob),
                    "bytes": raw,
                    "token_id": t.token_id,
                    "text_offset": self._advance(offsets, t.token_id, echo),
                    "top_logprobs": top if t.logprob is not None else [],
                }
            )
        return out

    def legacy(self, lps: list[TokenLogprob], offsets: TextOffsets, echo: bool = False) -> dict:
        out: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
            "token_ids": [],
        }
        for t in lps:
            text = self.info(t.token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(json_logprob(t.logprob))
            if t.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {self.info(i)[0]: json_logprob(v) for i, v in t.top}
                top.setdefault(text, json_logprob(t.logprob))
                out["top_logprobs"].append(top)
            out["text_offset"].append(self._advance(offsets, t.token_id, echo))
            out["token_ids"].append(t.token_id)
        return out

    def render(
        self, fmt: str, lps: list[TokenLogprob], offsets: TextOffsets, echo: bool = False
    ) -> dict:
        if fmt == "new":
            return {"content": self.new(lps, offsets, echo)}
        return self.legacy(lps, offsets, echo)

    @staticmethod
    def merge(fmt: str, a: dict, b: dict) -> dict:
        if fmt == "new":
            return {"content": a["content"] + b["content"]}
        return {k: a[k] + b[k] for k in a}
