"""The caller's side of one submitted request: a thread-safe queue of ChoiceUpdates that
the engine thread fills and the caller reads with `for` or `async for`."""

from __future__ import annotations

import asyncio
import queue
import time
from typing import Any

from engine.requests import GenerationRequest, Timing, TokenLogprob

DONE = object()  # pushed last: the request has ended


class Handle:
    """The caller's side of one request: iterate (sync or async) over ChoiceUpdates."""

    def __init__(self, request: GenerationRequest, prompt_tokens: int, max_tokens: int):
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.timing: Timing | None = None
        self.cached_tokens = 0  # prompt tokens a slot's cache held, not prefilled
        self.id = -1  # the loop's number for it, from its admission on
        # The caller asks (any thread, any time); the loop takes the request at the start of
        # its next iteration and only then sets `cancelled`, which is all it reads (in
        # lockstep every process must see a cancellation at the same point).
        self.cancel_asked = False
        self.cancelled = False
        self.submitted = time.perf_counter()
        # Updates always go through one thread-safe queue, so a handle can be read with
        # `for` or `async for` whatever thread made it (a sync generate() inside a running
        # event loop, as in a notebook, included); an async reader also gets woken up.
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def cancel(self) -> None:
        self.cancel_asked = True

    def _push(self, item: Any) -> None:  # called from the engine thread
        self._q.put(item)
        if self._waker is not None:
            loop, event = self._waker
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the caller's loop is gone; nobody is listening
                self.cancel_asked = True

    def __iter__(self):
        while (item := self._q.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self):
        event = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), event)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                await event.wait()  # set after every put, so nothing is missed
                event.clear()
                continue
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
