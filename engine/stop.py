"""Stop strings on streamed text, with hold-back so no part of a stop string is emitted."""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back the text that is safe to emit.

    Text that could be the start of a stop string is held until the following text
    rules it in (then generation stops and it is dropped) or out (then it is emitted).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""  # everything generated so far
        self.emitted = 0  # how much of `text` has been released
        self.stop_at: int | None = None  # index in `text` where a stop string begins

    def feed(self, delta: str) -> str:
        start = len(self.text)
        self.text += delta
        if self.stops:
            hits = [
                i for s in self.stops if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0
            ]
            if hits:
                self.stop_at = min(hits)
                return self._release(self.stop_at)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """Release everything held (the sequence ended without a stop string)."""
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        return max(
            (
                n
                for s in self.stops
                for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:n])
            ),
            default=0,
        )

    def _release(self, end: int) -> str:
        out = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out
