"""Tool calls in a finished model reply (OpenAI `tool_calls`), in the format the model's chat
template teaches it:

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks among text
  (Hermes, Qwen2.5; also the format of serving.tool_prompt's default prompt). A last block
  missing its `</tool_call>` (the model stopped right after the JSON) still counts.
- llama3_json: the whole reply, optionally after `<|python_tag|>`, is `{"name": ...,
  "parameters": {...}}`, or several such objects separated by ";" (Llama 3.1 / 3.2).
- mistral: `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}`.

A block the model got wrong (JSON that doesn't parse, a name not among the tools, arguments
that aren't an object) stays in the content as text: the client sees what the model wrote,
and model output never makes the server fail. A mistral array or a llama3_json reply is one
block: one bad call in it leaves all of it as text.

The content is the reply with its call blocks cut out, then stripped of leading and trailing
whitespace (str.strip), None when nothing is left. serving.tool_stream emits the same text
incrementally, built on the same block scanning (BlockEnd, block_calls, llama3_calls).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

HERMES, LLAMA3_JSON, MISTRAL = "hermes", "llama3_json", "mistral"
PYTHON_TAG = "<|python_tag|>"
# The marker opening a block, for the formats whose calls sit among text.
START = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]"}
HERMES_END = "</tool_call>"

_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, serialized (OpenAI sends arguments as a string)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_format(chat_template: str | None) -> str:
    """The tool-call format a model writes, read from its chat template's text."""
    template = chat_template or ""
    # A template naming the Hermes tag uses it, whatever else its instructions mention.
    if START[HERMES] in template:
        return HERMES
    if START[MISTRAL] in template:
        return MISTRAL
    if PYTHON_TAG in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3_JSON
    return HERMES


class BlockEnd:
    """Finds where the hermes or mistral block whose marker starts at `start` ends.
    Resumable: each `find` scans only the text added since the last one, so a stream that
    asks after every delta stays linear in the reply's length."""

    def __init__(self, fmt: str, start: int = 0):
        self.fmt = fmt
        self.body = start + len(START[fmt])  # just after the marker
        self.pos = self.body  # scanned up to here
        self.depth = 0  # mistral: brackets open outside strings
        self.in_string = False
        self.escaped = False

    def find(self, text: str) -> int | None:
        """The block's end (exclusive) once `text` shows it; None while it doesn't (in a
        finished reply the block then runs to the end)."""
        if self.fmt == HERMES:
            close = text.find(HERMES_END, self.pos)
            if close >= 0:
                return close + len(HERMES_END)
            self.pos = max(self.pos, len(text) - len(HERMES_END) + 1)
            return None
        return self._array_end(text)

    def _array_end(self, text: str) -> int | None:
        # Bracket matching, not parsing: json.loads judges the block once its end is known.
        for i in range(self.pos, len(text)):
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif self.depth == 0:  # between the marker and the array
                if c == "[":
                    self.depth = 1
                elif not c.isspace():
                    return self.body  # no array follows: the marker alone, as text
            elif c == '"':
                self.in_string = True
            elif c in "[{":
                self.depth += 1
            elif c in "]}":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        self.pos = len(text)
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity would not serialize back as JSON


def _loads(text: str) -> Any:
    """The JSON value, or None where the text isn't JSON (never raises on model output)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _call(obj: Any, tool_names: Collection[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call object, None unless it is a valid call."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    # Llama 3.1 names the arguments "parameters"; accept either key in every format.
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if not isinstance(name, str) or name not in tool_names or not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def block_calls(block: str, fmt: str, tool_names: Collection[str]) -> list[tuple[str, str]] | None:
    """The calls of one hermes or mistral block (from its marker to its end), None when the
    block is not a valid call (it is then content)."""
    body = block[len(START[fmt]) :]
    if fmt == HERMES:
        call = _call(_loads(body.removesuffix(HERMES_END)), tool_names)
        return [call] if call else None
    items = _loads(body)
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(item, tool_names) for item in items]
    return None if None in calls else calls


def llama3_calls(text: str, tool_names: Collection[str]) -> list[tuple[str, str]] | None:
    """The calls of a whole llama3_json reply, None unless all of it is valid calls."""
    body = text.strip().removeprefix(PYTHON_TAG)
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    calls = []
    pos = _SPACE.match(body).end()
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):
            return None
        call = _call(obj, tool_names)
        if call is None:
            return None
        calls.append(call)
        pos = _SPACE.match(body, pos).end()
        if pos < len(body):
            if body[pos] != ";":
                return None
            pos = _SPACE.match(body, pos + 1).end()
    return calls or None


def parse_reply(
    text: str,
    fmt: str,
    tool_names: Collection[str],
    new_id: Callable[[], str] = new_call_id,
) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished reply in format `fmt` (see the module docstring).
    `new_id` makes each call's id, in order (a test can make them deterministic)."""
    if fmt == LLAMA3_JSON:
        found = llama3_calls(text, tool_names)
        if found:
            return None, [ToolCall(new_id(), name, args) for name, args in found]
        return text.strip() or None, []
    marker = START[fmt]
    pieces: list[str] = []
    found = []
    pos = 0
    while (start := text.find(marker, pos)) >= 0:
        end = BlockEnd(fmt, start).find(text)
        end = len(text) if end is None else end
        calls = block_calls(text[start:end], fmt, tool_names)
        pieces.append(text[pos:start] if calls else text[pos:end])
        found += calls or []
        pos = end
    pieces.append(text[pos:])
    content = "".join(pieces).strip() or None
    return content, [ToolCall(new_id(), name, args) for name, args in found]
