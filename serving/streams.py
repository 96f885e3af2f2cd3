"""The async plumbing of one HTTP request: its engine handles merged into one stream, the
client's disconnect turned into cancellation, and the SSE response that writes the chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from engine.requests import ChoiceUpdate, RequestHandle

_DONE = object()


class ClientGone(Exception):
    """The client disconnected; its handles are cancelled."""


class EngineFailure(Exception):
    """The engine ended a request with an error (`cause`); the engine has logged it."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class Generation:
    """The handles of one HTTP request (one per prompt) merged into one stream of
    (choice index, prompt index, ChoiceUpdate), choice index = prompt index * n + index."""

    def __init__(self, handles: list[RequestHandle], n: int):
        self.handles = handles
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.tasks = [asyncio.create_task(self._pump(p, h)) for p, h in enumerate(handles)]

    async def _pump(self, p: int, handle: RequestHandle) -> None:
        try:
            async for update in handle:
                self.queue.put_nowait((p * self.n + update.index, p, update))
            self.queue.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, not swallowed
            self.queue.put_nowait(EngineFailure(e))

    def cancel(self) -> None:
        """Client gone: free the engine's slots and wake the consumer."""
        if self.cancelled:
            return
        self.cancelled = True
        for h in self.handles:
            h.cancel()
        self.queue.put_nowait(ClientGone())

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, int, ChoiceUpdate]]:
        remaining = len(self.tasks)
        while remaining:
            item = await self.queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item


async def watch_disconnect(receive: Callable, on_disconnect: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class SSEResponse(Response):
    """text/event-stream from an async iterator of ready-made `data:` events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str], on_close: Callable):
        self.status_code = 200
        self.background = None
        # No body attribute: init_headers then declares no Content-Length (chunked stream).
        self.init_headers({**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            pass
        finally:
            await self.events.aclose()
            self.on_close()
