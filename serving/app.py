"""The HTTP server: Starlette routes, SSE streaming, Fireworks headers, auth and metrics.

One request's life: read the body (size-limited) → `protocol` validates it and builds one
GenerationRequest per prompt → `engine.submit` → the handles' updates are merged into one
stream of (choice index, ChoiceUpdate) → either collected into a completion object or sent
as SSE chunks. A client that disconnects cancels its handles (their slots free at the next
engine step). Response shapes follow SAMPLING.md section 4, errors section 5.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.requests import (
    ChoiceUpdate,
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    TokenLogprob,
)
from samplers import SamplingParamsError
from serving import protocol
from serving.metrics import Metrics
from serving.protocol import APIError, Prepared

NEG_INF_LOGPROB = -9999.0  # how -inf is written in JSON (OpenAI / vLLM convention)
RETRY_AFTER_S = 1


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content).encode()


def error_response(e: APIError) -> Response:
    return _JSON(e.body(), status_code=e.status, headers=e.headers)


def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else NEG_INF_LOGPROB


def _engine_error(e: Exception) -> APIError:
    """An engine exception raised at submit (or before the first token) as an HTTP error."""
    if isinstance(e, EngineOverloaded):
        return APIError(
            503,
            str(e) or "The server is overloaded; retry later",
            type="service_unavailable",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, ContextLengthExceeded):
        return APIError(400, str(e), param=e.field, code="context_length_exceeded")
    if isinstance(e, (InvalidRequest, SamplingParamsError)):
        return APIError(400, str(e), param=e.field)
    return APIError(500, f"engine error: {e}", type="internal_error")


class _ClientGone(Exception):
    pass


_DONE = object()


class Generation:
    """The handles of one HTTP request (one per prompt) merged into one stream of
    (choice index, ChoiceUpdate), with choice index = prompt index * n + update.index."""

    def __init__(self, handles: list[Any], n: int):
        self.handles = handles
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.tasks = [asyncio.create_task(self._pump(p, h)) for p, h in enumerate(handles)]

    async def _pump(self, p: int, handle: Any) -> None:
        try:
            async for update in handle:
                self.queue.put_nowait((p * self.n + update.index, p, update))
            self.queue.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
            self.queue.put_nowait(e)

    def cancel(self) -> None:
        """Client gone: free the engine's slots and wake the consumer."""
        if self.cancelled:
            return
        self.cancelled = True
        for h in self.handles:
            h.cancel()
        self.queue.put_nowait(_ClientGone())

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


async def _watch_disconnect(receive: Callable, on_disconnect: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.last_time: float | None = None


class _Offsets:
    """Character offsets of tokens in the returned text (text_offset)."""

    def __init__(self) -> None:
        self.chars = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(raw))
        return at


class _Renderer:
    """Token strings / bytes (cached) and the two logprobs formats of SAMPLING.md 4.2-4.3."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.info = functools.lru_cache(maxsize=1 << 16)(self._info)

    def _info(self, token_id: int) -> tuple[str, list[int], bool]:
        try:
            raw = self.tok.token_bytes(token_id)
        except Exception:  # an id outside the tokenizer (padded vocabulary)
            raw = b""
        try:
            special = bool(self.tok.is_special(token_id))
        except Exception:
            special = False
        return raw.decode("utf-8", "replace"), list(raw), special

    def _advance(self, offsets: _Offsets, token_id: int, in_text: bool) -> int:
        text, raw, special = self.info(token_id)
        return offsets.next(bytes(raw) if in_text or not special else b"")

    def new(self, lps: list[TokenLogprob], offsets: _Offsets, echo: bool = False) -> list[dict]:
        out = []
        for t in lps:
            text, raw, _ = self.info(t.token_id)
            top = []
            for i, v in t.top:
                alt_text, alt_raw, _ = self.info(i)
                top.append({"token": alt_text, "logprob": _lp(v), "token_id": i, "bytes": alt_raw})
            out.append(
                {
                    "token": text,
                    "logprob": _lp(t.logprob),
                    "sampling_logprob": _lp(t.sampling_logprob),
                    "bytes": raw,
                    "token_id": t.token_id,
                    "text_offset": self._advance(offsets, t.token_id, echo),
                    "top_logprobs": top if t.logprob is not None else [],
                }
            )
        return out

    def legacy(self, lps: list[TokenLogprob], offsets: _Offsets, echo: bool = False) -> dict:
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
            out["token_logprobs"].append(_lp(t.logprob))
            if t.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {self.info(i)[0]: _lp(v) for i, v in t.top}
                top.setdefault(text, _lp(t.logprob))
                out["top_logprobs"].append(top)
            out["text_offset"].append(self._advance(offsets, t.token_id, echo))
            out["token_ids"].append(t.token_id)
        return out

    def render(
        self, fmt: str, lps: list[TokenLogprob], offsets: _Offsets, echo: bool = False
    ) -> dict:
        if fmt == "new":
            return {"content": self.new(lps, offsets, echo)}
        return self.legacy(lps, offsets, echo)

    @staticmethod
    def merge(fmt: str, a: dict, b: dict) -> dict:
        if fmt == "new":
            return {"content": a["content"] + b["content"]}
        return {k: a[k] + b[k] for k in a}


class _Server:
    def __init__(self, engine: Any, api_key: str | None, max_body_bytes: int):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.render = _Renderer(engine.tokenizer)
        self.created = int(time.time())

    # ------------------------------------------------------------------ request plumbing

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401,
                "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        too_large = APIError(
            413,
            f"Request body exceeds the allowed size limit of {limit} bytes",
            code="request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "client disconnected while sending the body") from None
        return b"".join(chunks)

    def _submit(self, prepared: Prepared) -> list[Any]:
        handles: list[Any] = []
        try:
            for r in prepared.requests:
                handles.append(self.engine.submit(r))
        except Exception as e:
            for h in handles:
                h.cancel()
            raise _engine_error(e) from None
        return handles

    # --------------------------------------------------------------------------- routes

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, "completion")

    async def _completion(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            body = protocol.parse_json(await self._body(request))
            if kind == "chat":
                req = protocol.parse_request(protocol.ChatRequest, body)
            else:
                req = protocol.parse_request(protocol.CompletionRequest, body)
            if not protocol.resolve_model(req.model, self.engine.name):
                raise APIError(
                    404,
                    "Model not found, inaccessible, and/or not deployed",
                    param="model",
                    code="NOT_FOUND",
                )
            if kind == "chat":
                prepared = protocol.prepare_chat(req, self.engine)
            else:
                prepared = protocol.prepare_completion(req, self.engine)
            handles = self._submit(prepared)
            response = await self._run(prepared, handles, request, t0)
        except APIError as e:
            response = error_response(e)
        self.metrics.requests.inc(1, kind, str(response.status_code))
        return response

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return error_response(e)
        card = {
            "id": self.engine.name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxfire",
            "context_length": self.engine.max_context,
        }
        return _JSON({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return _JSON({"status": "ok", **self.engine.stats()})

    async def metrics_endpoint(self, request: Request) -> Response:
        body = self.metrics.render(self.engine.stats())
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------ generation

    async def _run(
        self, prepared: Prepared, handles: list[Any], request: Request, t0: float
    ) -> Response:
        gen = Generation(handles, prepared.n)
        state = _RunState(self, prepared, handles, t0)

        def disconnected() -> None:
            if not gen.cancelled:
                self.metrics.cancelled.inc()
            gen.cancel()

        watcher = asyncio.create_task(_watch_disconnect(request.receive, disconnected))
        self.metrics.in_flight += 1

        def cleanup() -> None:
            watcher.cancel()
            if not gen.cancelled and any(c.finish_reason is None for c in state.choices):
                gen.cancel()  # ended early (an error): free the slots all the same
            gen.close()
            state.done()

        handed_over = False
        try:
            stream = gen.__aiter__()
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            except _ClientGone:
                return Response(status_code=499)
            except Exception as e:
                raise _engine_error(e) from None
            state.first_token()
            if prepared.stream:
                events = state.sse(first, stream)
                handed_over = True
                return _SSEResponse(events, state.headers(streaming=True), on_close=cleanup)
            try:
                if first is not None:
                    state.add(*first)
                    async for item in stream:
                        state.add(*item)
            except _ClientGone:
                return Response(status_code=499)
            except Exception as e:
                raise _engine_error(e) from None
            return _JSON(state.body(), headers=state.headers(streaming=False))
        finally:
            if not handed_over:
                cleanup()

    def routes(self) -> list[Route]:
        routes = []
        for prefix in ("/v1", "/inference/v1"):
            routes += [
                Route(f"{prefix}/chat/completions", self.chat, methods=["POST"]),
                Route(f"{prefix}/completions", self.completions, methods=["POST"]),
                Route(f"{prefix}/models", self.models, methods=["GET"]),
            ]
        routes += [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        return routes


class _RunState:
    """Accumulates one request's choices and renders bodies, chunks and headers."""

    def __init__(self, server: _Server, prepared: Prepared, handles: list[Any], t0: float):
        self.server = server
        self.metrics = server.metrics
        self.p = prepared
        self.handles = handles
        self.t0 = t0
        self.ttft: float | None = None
        self.choices = [_Choice() for _ in range(len(handles) * prepared.n)]
        self.offsets = [_Offsets() for _ in self.choices]
        self.id = ("chatcmpl-" if prepared.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(int(h.prompt_tokens) for h in handles)
        self.completion_tokens = 0
        self.finished = False
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    # ------------------------------------------------------------------------ bookkeeping

    def first_token(self) -> None:
        self.ttft = time.perf_counter() - self.t0
        self.metrics.ttft.observe(self.ttft)

    def add(self, index: int, prompt: int, u: ChoiceUpdate) -> None:
        c = self.choices[index]
        now = time.perf_counter()
        k = len(u.token_ids)
        if k:
            if c.last_time is not None:
                self.metrics.itl.observe((now - c.last_time) / k, k)
            c.last_time = now
            self.completion_tokens += k
            self.metrics.generation_tokens.inc(k)
        c.text.append(u.text)
        c.token_ids.extend(u.token_ids)
        if u.logprobs:
            c.logprobs.extend(u.logprobs)
        if u.finish_reason is not None:
            c.finish_reason = u.finish_reason

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.in_flight -= 1
            self.metrics.duration.observe(time.perf_counter() - self.t0)

    def cached_tokens(self) -> int:
        """Prompt tokens served from a slot's cache (set when each prompt is admitted)."""
        return sum(int(h.cached_tokens) for h in self.handles)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens()},
        }

    def perf_metrics(self) -> dict:
        return {
            "prompt-tokens": str(self.prompt_tokens),
            "cached-prompt-tokens": str(self.cached_tokens()),
            "server-time-to-first-token": f"{self.ttft or 0.0:.3f}",
            "server-processing-time": f"{time.perf_counter() - self.t0:.3f}",
        }

    def headers(self, streaming: bool) -> dict[str, str]:
        options = dict(self.p.options)
        options["max_tokens"] = min(int(h.max_tokens) for h in self.handles)
        headers = {
            "fireworks-sampling-options": _dumps(options),
            "fireworks-prompt-tokens": str(self.prompt_tokens),
            "fireworks-cached-prompt-tokens": "0",
            "fireworks-server-time-to-first-token": f"{self.ttft or 0.0:.3f}",
        }
        if not streaming:
            headers["fireworks-server-processing-time"] = f"{time.perf_counter() - self.t0:.3f}"
        return headers

    # -------------------------------------------------------------------------- pieces

    def _echo(self, index: int) -> tuple[str, list[TokenLogprob] | None]:
        """The echoed prompt text of a choice and, with logprobs, its entries."""
        prompt_idx = index // self.p.n
        prompt = self.p.prompts[prompt_idx]
        if not prompt.echo_ids:
            return "", None
        if self.p.logprobs_format is None:
            return prompt.echo_text, None
        lps = getattr(self.handles[prompt_idx], "prompt_logprobs", None) or ()
        lps = list(lps)[prompt.echo_offset :]
        if prompt.echo_offset > 0 and lps and lps[0].logprob is None:
            lps = lps[1:]
        return prompt.echo_text, lps

    def _raw_output(self, index: int, lp: dict | None) -> dict:
        c = self.choices[index]
        prompt = self.p.prompts[index // self.p.n]
        tok = self.server.engine.tokenizer
        completion_lp = None
        if self.p.logprobs_format is not None:
            completion_lp = {"content": self.server.render.new(c.logprobs, _Offsets())}
        return {
            "prompt_fragments": prompt.fragments,
            "prompt_token_ids": prompt.ids,
            "completion": tok.decode(c.token_ids, skip_special_tokens=False),
            "completion_token_ids": list(c.token_ids),
            "completion_logprobs": completion_lp,
            "grammar": None,
            "images": None,
        }

    # -------------------------------------------------------------------- non-streaming

    def body(self) -> dict:
        fmt = self.p.logprobs_format
        chat = self.p.kind == "chat"
        choices = []
        for i, c in enumerate(self.choices):
            echo_text, echo_lps = self._echo(i)
            logprobs = None
            if fmt is not None:
                logprobs = self.server.render.render(fmt, echo_lps or [], self.offsets[i], True)
                more = self.server.render.render(fmt, c.logprobs, self.offsets[i])
                logprobs = _Renderer.merge(fmt, logprobs, more)
            text = echo_text + "".join(c.text)
            choice: dict[str, Any] = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": None}
            else:
                choice["text"] = text
            choice["finish_reason"] = c.finish_reason or "length"
            choice["logprobs"] = logprobs
            if self.p.raw_output:
                choice["raw_output"] = self._raw_output(i, logprobs)
            if self.p.return_token_ids:
                if not chat:
                    choice["prompt_token_ids"] = self.p.prompts[i // self.p.n].ids
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.p.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if chat and self.p.return_token_ids:
            body["prompt_token_ids"] = self.p.prompts[0].ids
        if self.p.perf_metrics:
            body["perf_metrics"] = self.perf_metrics()
        return body

    # ------------------------------------------------------------------------ streaming

    def _chunk(self, choice: dict | None, usage: dict | None = None, **extra: Any) -> bytes:
        chat = self.p.kind == "chat"
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.p.model,
            "choices": [choice] if choice is not None else [],
            "usage": usage,
        }
        obj.update(extra)
        return b"data: " + _dumps(obj).encode() + b"\n\n"

    def _delta(
        self,
        index: int,
        text: str | None,
        lps: list[TokenLogprob] | None,
        ids: list[int] | None,
        echo: bool = False,
        finish: str | None = None,
    ) -> dict:
        fmt = self.p.logprobs_format
        logprobs = None
        if fmt is not None and lps is not None:
            logprobs = self.server.render.render(fmt, lps, self.offsets[index], echo)
        if self.p.kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice["finish_reason"] = finish
        choice["logprobs"] = logprobs
        if self.p.return_token_ids and ids is not None:
            choice["token_ids"] = ids
        return choice

    async def sse(
        self, first: tuple | None, rest: AsyncIterator[tuple[int, int, ChoiceUpdate]]
    ) -> AsyncIterator[bytes]:
        chat = self.p.kind == "chat"
        n_choices = len(self.choices)
        pending_text = [""] * n_choices
        pending_lps: list[list[TokenLogprob]] = [[] for _ in range(n_choices)]
        pending_ids: list[list[int]] = [[] for _ in range(n_choices)]
        try:
            for i in range(n_choices):
                extra = {}
                if chat and self.p.return_token_ids and i == 0:
                    extra["prompt_token_ids"] = self.p.prompts[0].ids
                if chat:
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}}
                    role.update(finish_reason=None, logprobs=None)
                    yield self._chunk(role, **extra)
                echo_text, echo_lps = self._echo(i)
                if echo_text:
                    choice = self._delta(i, echo_text, echo_lps, None, echo=True)
                    if not chat and self.p.return_token_ids:
                        choice["prompt_token_ids"] = self.p.prompts[i // self.p.n].ids
                    yield self._chunk(choice)
                elif not chat and self.p.return_token_ids:
                    choice = self._delta(i, "", None, [])
                    choice["prompt_token_ids"] = self.p.prompts[i // self.p.n].ids
                    yield self._chunk(choice)

            async def items() -> AsyncIterator[tuple[int, int, ChoiceUpdate]]:
                if first is not None:
                    yield first
                async for item in rest:
                    yield item

            async for index, prompt, u in items():
                self.add(index, prompt, u)
                pending_text[index] += u.text
                pending_lps[index] += list(u.logprobs or ())
                pending_ids[index] += list(u.token_ids)
                if pending_text[index]:
                    yield self._chunk(
                        self._delta(
                            index, pending_text[index], pending_lps[index], pending_ids[index]
                        )
                    )
                    pending_text[index], pending_lps[index], pending_ids[index] = "", [], []
                if u.finish_reason is not None:
                    lps = pending_lps[index] if pending_lps[index] else None
                    ids = pending_ids[index]
                    choice = self._delta(index, None, lps, ids, finish=u.finish_reason)
                    if self.p.raw_output:
                        choice["raw_output"] = self._raw_output(index, None)
                    extra = {"perf_metrics": self.perf_metrics()} if self.p.perf_metrics else {}
                    yield self._chunk(choice, self.usage(), **extra)
                    pending_lps[index], pending_ids[index] = [], []
            if self.p.include_usage:
                yield self._chunk(None, self.usage())
            yield b"data: [DONE]\n\n"
        except _ClientGone:
            return
        except Exception as e:  # the engine failed mid-stream: tell the client, then end
            error = APIError(500, f"engine error: {e}", type="internal_error")
            if isinstance(e, (EngineError, SamplingParamsError)):
                error = _engine_error(e)
            yield b"data: " + _dumps(error.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"


class _SSEResponse(Response):
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


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Not found: {request.url.path}"
        err = APIError(404, message, code="NOT_FOUND")
    elif exc.status_code == 405:
        err = APIError(
            405,
            f"Method {request.method} not allowed for {request.url.path}",
            code="method_not_allowed",
        )
    else:
        err = APIError(exc.status_code, str(exc.detail))
    err.headers.update(exc.headers or {})
    return error_response(err)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(APIError(500, f"internal error: {exc}", type="internal_error"))


def create_app(
    engine: Any, *, api_key: str | None = None, max_body_bytes: int = 2_000_000
) -> Starlette:
    """The HTTP app over an engine (see engine.api.Engine for what it must offer)."""
    server = _Server(engine, api_key, max_body_bytes)
    app = Starlette(
        routes=server.routes(),
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
    )
    app.state.server = server
    app.state.metrics = server.metrics
    return app


def serve(engine: Any, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Serve `engine` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(engine, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=30)
