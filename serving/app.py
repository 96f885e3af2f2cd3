"""The HTTP server: routes, auth, error envelopes and the access log.

One request's life: read the body (size-limited) → parse it into a `protocol` schema →
`prepare` builds one GenerationRequest per prompt → `engine.submit` (the engine's admission
check refuses what it cannot honour, naming the field) → the handles' updates are merged into
one stream and rendered (`render.Reply`) as one completion object or as SSE chunks. A client
that disconnects cancels its handles (their slots free at the next engine step).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.requests import ChoiceUpdate, RequestHandle, ServingEngine
from serving import prepare, protocol
from serving.body import parse_json
from serving.errors import APIError, internal_error, refusal, show
from serving.logprobs import LogprobRenderer
from serving.metrics import Metrics
from serving.prepare import Prepared
from serving.render import Reply, dumps, failure_error
from serving.streams import ClientGone, EngineFailure, Generation, SSEResponse, watch_disconnect

log = logging.getLogger("jaxfire.server")
access_log = logging.getLogger("jaxfire.access")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


def error_response(e: APIError) -> Response:
    return _JSON(e.body(), status_code=e.status, headers=e.headers)


def _log_access(
    path: str, status: int, reply: Reply | None = None, t0: float = 0.0, param: str | None = None
) -> None:
    """One line per completion request, with the engine's figures when it got that far."""
    if reply is None:
        field = f" param={param}" if param else ""
        access_log.info("%s %d total=%.3fs%s", path, status, time.perf_counter() - t0, field)
        return
    user = f" user={show(reply.p.user)}" if reply.p.user else ""
    access_log.info(
        "%s %d id=%s prompt=%d cached=%d completion=%d ttft=%.3fs total=%.3fs%s",
        path,
        reply.status,
        reply.id,
        reply.prompt_tokens,
        reply.cached_tokens(),
        reply.completion_tokens,
        reply.ttft or 0.0,
        reply.elapsed(),
        user,
    )


class _Server:
    def __init__(self, engine: ServingEngine, api_key: str | None, max_body_bytes: int):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.logprobs = LogprobRenderer(engine.tokenizer)
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

    def _submit(self, prepared: Prepared) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for r in prepared.requests:
                handles.append(self.engine.submit(r))
        except Exception as e:
            for h in handles:
                h.cancel()
            error = refusal(e, prepared.field_names)
            if error is None:  # not the client's fault: logged once, answered with a 500
                log.exception("submitting a request failed")
                error = internal_error(f"internal error: {e}")
            raise error from None
        return handles

    def _admit(self, kind: str, body: Any) -> tuple[Prepared, list[RequestHandle]]:
        prepared = self._prepare(kind, body)
        return prepared, self._submit(prepared)

    def _prepare(self, kind: str, body: dict) -> Prepared:
        schema = protocol.ChatRequest if kind == "chat" else protocol.CompletionRequest
        req = protocol.parse_request(schema, body)
        if not prepare.resolve_model(req.model, self.engine.name):
            raise APIError(
                404,
                "Model not found, inaccessible, and/or not deployed",
                param="model",
                code="NOT_FOUND",
            )
        if kind == "chat":
            return prepare.prepare_chat(req, self.engine)
        return prepare.prepare_completion(req, self.engine)

    # --------------------------------------------------------------------------- routes

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, "completion")

    async def _completion(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        path = request.url.path
        try:
            self._auth(request)
            body = parse_json(await self._body(request))
            if isinstance(body, dict) and (body.get("response_format") or body.get("tools")):
                # Building and compiling a grammar can take a while: off the event loop.
                prepared, handles = await run_in_threadpool(self._admit, kind, body)
            else:
                prepared, handles = self._admit(kind, body)
        except APIError as e:
            response = error_response(e)
            _log_access(path, e.status, t0=t0, param=e.param)
        else:
            reply = Reply(
                prepared,
                handles,
                t0,
                self.engine.tokenizer,
                self.logprobs,
                self.metrics,
                on_done=lambda r: _log_access(path, r.status, r),
            )
            response = await self._run(reply, request)
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

    async def _run(self, reply: Reply, request: Request) -> Response:
        """Wait for the first token (errors before it are plain HTTP errors), then stream
        the rest or collect it into one body."""
        gen = Generation(reply.handles, reply.p.n)

        def disconnected() -> None:
            if not gen.cancelled:
                self.metrics.cancelled.inc()
            gen.cancel()

        watcher = asyncio.create_task(watch_disconnect(request.receive, disconnected))
        self.metrics.in_flight += 1

        def cleanup() -> None:
            watcher.cancel()
            if not gen.cancelled and reply.unfinished():
                gen.cancel()  # ended early (an error): free the slots all the same
            gen.close()
            reply.done()

        handed_over = False
        try:
            stream = gen.__aiter__()
            try:
                first = await anext(stream, None)
            except ClientGone:
                reply.status = 499
                return Response(status_code=499)
            except EngineFailure as e:
                return self._failed(reply, failure_error(e))
            reply.first_token()
            if reply.p.stream:
                events = reply.sse(_prepend(first, stream))
                response = SSEResponse(events, reply.headers(streaming=True), on_close=cleanup)
                handed_over = True  # the response's close runs cleanup from now on
                return response
            try:
                async for item in _prepend(first, stream):
                    reply.add(*item)
            except ClientGone:
                reply.status = 499
                return Response(status_code=499)
            except EngineFailure as e:
                return self._failed(reply, failure_error(e))
            return _JSON(reply.body(), headers=reply.headers(streaming=False))
        except Exception as e:  # a bug while rendering: logged once, the client gets a 500
            log.exception("request %s failed", reply.id)
            return self._failed(reply, internal_error(f"internal error: {e}"))
        finally:
            if not handed_over:
                cleanup()

    @staticmethod
    def _failed(reply: Reply, error: APIError) -> Response:
        reply.status = error.status
        return error_response(error)

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


async def _prepend(
    first: tuple | None, rest: AsyncIterator[tuple[int, int, ChoiceUpdate]]
) -> AsyncIterator[tuple[int, int, ChoiceUpdate]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = APIError(404, f"Not found: {request.url.path}", code="NOT_FOUND")
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
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error(f"internal error: {exc}"))


def create_app(
    engine: ServingEngine, *, api_key: str | None = None, max_body_bytes: int = 2_000_000
) -> Starlette:
    """The HTTP app over an engine (engine.requests.ServingEngine says what it must offer)."""
    server = _Server(engine, api_key, max_body_bytes)
    app = Starlette(
        routes=server.routes(),
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
    )
    app.state.server = server
    app.state.metrics = server.metrics
    return app


def serve(
    engine: ServingEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Serve `engine` with uvicorn until interrupted; the app writes its own access log
    (jaxfire.access, with the engine's figures), so uvicorn's is off."""
    import uvicorn

    app = create_app(engine, **app_kwargs)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        log_config=None,  # keep the logging the CLI configured
        timeout_keep_alive=30,
    )
