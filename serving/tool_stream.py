"""Tool calls in a streamed reply: text deltas in, content deltas and tool-call events out.

Whatever the split of a reply into deltas, the events add up to serving.tool_calls.parse_reply
of the whole reply: the ContentDelta texts concatenate to its content ("" for None) and the
calls (a ToolCallStart, then its arguments as ArgumentsDelta fragments) equal its calls.

- Text that may open a call is held back until it is known not to: a suffix that is a prefix
  of the block marker ("<tool" for hermes, "[TOOL" for mistral), and for llama3_json a reply
  whose first non-space text is "{" or "<|python_tag|>" (all of it, until finish()).
- A call is emitted when its block is complete (a ToolCallStart and one ArgumentsDelta with
  all its arguments): until then it may turn out invalid and be content after all.
- Whitespace, as parse_reply's strip(): leading whitespace is dropped, and whitespace is
  withheld until more content follows it, so the trailing whitespace is never sent.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from serving.tool_calls import (
    LLAMA3_JSON,
    PYTHON_TAG,
    START,
    BlockEnd,
    block_calls,
    llama3_calls,
    new_call_id,
)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    fragment: str


StreamEvent = ContentDelta | ToolCallStart | ArgumentsDelta


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (a marker in the making)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallStream:
    """One choice's reply, fed delta by delta (see the module docstring)."""

    def __init__(
        self, fmt: str, tool_names: Collection[str], new_id: Callable[[], str] = new_call_id
    ):
        self.fmt = fmt
        self.tool_names = frozenset(tool_names)
        self.new_id = new_id
        self._buf = ""  # text not yet resolved into events
        self._block: BlockEnd | None = None  # the open block, whose marker starts _buf
        self._calls = 0  # calls emitted (the next call's index)
        self._started = False  # whether content was emitted (until then whitespace is dropped)
        self._space = ""  # whitespace withheld: content only if more content follows
        self._json: bool | None = None  # llama3_json: reply held as JSON; None: undecided

    def feed(self, delta: str) -> list[StreamEvent]:
        self._buf += delta
        if self.fmt == LLAMA3_JSON:
            return self._feed_llama3()
        marker = START[self.fmt]
        events: list[StreamEvent] = []
        while True:
            if self._block is None:
                start = self._buf.find(marker)
                if start < 0:
                    cut = len(self._buf) - _partial_marker(self._buf, marker)
                    events += self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return events
                events += self._content(self._buf[:start])
                self._buf = self._buf[start:]
                self._block = BlockEnd(self.fmt)
            end = self._block.find(self._buf)
            if end is None:
                return events
            events += self._close(end)

    def finish(self) -> list[StreamEvent]:
        """The events of the held-back text, once the reply is complete."""
        if self.fmt == LLAMA3_JSON and self._json is not False:
            found = llama3_calls(self._buf, self.tool_names)
            if found:
                self._buf = ""
                return self._emit_calls(found)
        events = self._close(len(self._buf)) if self._block is not None else []
        events += self._content(self._buf)
        self._buf = ""
        return events

    def _feed_llama3(self) -> list[StreamEvent]:
        if self._json is None:
            head = self._buf.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []  # can't tell yet
            self._json = head.startswith(("{", PYTHON_TAG))
        if self._json:
            return []
        text, self._buf = self._buf, ""
        return self._content(text)

    def _close(self, end: int) -> list[StreamEvent]:
        """Resolve the open block, _buf[:end]."""
        block, self._buf, self._block = self._buf[:end], self._buf[end:], None
        found = block_calls(block, self.fmt, self.tool_names)
        return self._emit_calls(found) if found else self._content(block)

    def _emit_calls(self, found: list[tuple[str, str]]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for name, args in found:
            events += [ToolCallStart(self._calls, self.new_id(), name)]
            events += [ArgumentsDelta(self._calls, args)]
            self._calls += 1
        return events

    def _content(self, text: str) -> list[StreamEvent]:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        return [ContentDelta(body)] if body else []
