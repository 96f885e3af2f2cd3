"""One request's output as HTTP: what each choice has produced, and the bodies, SSE chunks,
usage and Fireworks headers built from it (docs/sampling.md section 4)."""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.requests import ChatTokenizer, ChoiceUpdate, RequestHandle, TokenLogprob
from serving.errors import internal_error, refusal
from serving.logprobs import LogprobRenderer, TextOffsets
from serving.metrics import Metrics
from serving.prepare import Prepared
from serving.streams import ClientGone, EngineFailure
from serving.tool_calls import parse_reply
from serving.tool_stream import ArgumentsDelta, ContentDelta, ToolCallStart, ToolCallStream

log = logging.getLogger("jaxfire.server")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def failure_error(e: EngineFailure):
    """The error a client sees for a request the engine ended with an error."""
    return refusal(e.cause) or internal_error(f"engine error: {e.cause}")


class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.last_time: float | None = None


class Reply:
    """Accumulates one request's choices and renders bodies, chunks and headers."""

    def __init__(
        self,
        prepared: Prepared,
        handles: list[RequestHandle],
        t0: float,
        tokenizer: ChatTokenizer,
        logprobs: LogprobRenderer,
        metrics: Metrics,
        on_done: Callable[[Reply], None],
    ):
        self.p = prepared
        self.handles = handles
        self.t0 = t0
        self.tok = tokenizer
        self.render = logprobs
        self.metrics = metrics
        self.on_done = on_done
        self.ttft: float | None = None
        self.choices = [_Choice() for _ in range(len(handles) * prepared.n)]
        self.offsets = [TextOffsets() for _ in self.choices]
        self.id = ("chatcmpl-" if prepared.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(int(h.prompt_tokens) for h in handles)
        self.completion_tokens = 0
        self.status = 200  # what the access log reports: the HTTP status, or 499 / 500
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

    def unfinished(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.in_flight -= 1
            self.metrics.duration.observe(self.elapsed())
            self.on_done(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (set when each prompt is admitted)."""
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
            "server-processing-time": f"{self.elapsed():.3f}",
        }

    def headers(self, streaming: bool) -> dict[str, str]:
        """Sent before the body: a streamed request's counts are those known at its first
        token (with several prompts, one still queued then has no cached count yet; the
        usage in the last chunk has the final one)."""
        options = dict(self.p.options)
        options["max_tokens"] = min(int(h.max_tokens) for h in self.handles)
        headers = {
            "fireworks-sampling-options": dumps(options),
            "fireworks-prompt-tokens": str(self.prompt_tokens),
            "fireworks-cached-prompt-tokens": str(self.cached_tokens()),
            "fireworks-server-time-to-first-token": f"{self.ttft or 0.0:.3f}",
        }
        if not streaming:
            headers["fireworks-server-processing-time"] = f"{self.elapsed():.3f}"
        return headers

    # -------------------------------------------------------------------------- pieces

    def _echo(self, index: int) -> tuple[str, list[TokenLogprob] | None]:
        """The echoed prompt text of a choice and, with logprobs, its entries."""
        prompt_idx = index // self.p.n
        prompt = self.p.prompts[prompt_idx]
        if not prompt.echo_ids:
            return "", None
        text = prompt.echo_text
        if text is None:
            text = self.tok.decode(prompt.echo_ids, skip_special_tokens=False)
        if self.p.logprobs_format is None:
            return text, None
        lps = list(self.handles[prompt_idx].prompt_logprobs or ())[prompt.echo_offset :]
        if prompt.echo_offset > 0 and lps and lps[0].logprob is None:
            lps = lps[1:]
        return text, lps

    def _raw_output(self, index: int) -> dict:
        c = self.choices[index]
        prompt = self.p.prompts[index // self.p.n]
        completion_lp = None
        if self.p.logprobs_format is not None:
            completion_lp = {"content": self.render.new(c.logprobs, TextOffsets())}
        return {
            "prompt_fragments": prompt.fragments,
            "prompt_token_ids": prompt.ids,
            "completion": self.tok.decode(c.token_ids, skip_special_tokens=False),
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
                logprobs = self.render.render(fmt, echo_lps or [], self.offsets[i], True)
                more = self.render.render(fmt, c.logprobs, self.offsets[i])
                logprobs = LogprobRenderer.merge(fmt, logprobs, more)
            text = echo_text + "".join(c.text)
            choice: dict[str, Any] = {"index": i}
            reason = c.finish_reason or "length"
            if chat:
                choice["message"], reason = self._message(text, reason)
            else:
                choice["text"] = text
            choice["finish_reason"] = reason
            choice["logprobs"] = logprobs
            if self.p.raw_output:
                choice["raw_output"] = self._raw_output(i)
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

    def _message(self, text: str, reason: str) -> tuple[dict, str]:
        """The assistant message and finish reason of a chat choice: with tools, the calls
        the reply makes are its tool_calls (finish_reason "tool_calls")."""
        tools = self.p.tools
        if tools is None:
            return {"role": "assistant", "content": text, "tool_calls": None}, reason
        content, calls = parse_reply(text, tools.fmt, tools.names)
        message = {"role": "assistant", "content": content, "tool_calls": None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        return message, _call_reason(bool(calls), reason)

    # ------------------------------------------------------------------------ streaming

    def _chunk(self, choice: dict | None, usage: dict | None = None, **extra: Any) -> bytes:
        chat = self.p.kind == "chat"
        if usage is None and self.p.continuous_usage:
            usage = self.usage()
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.p.model,
            "choices": [choice] if choice is not None else [],
            "usage": usage,
        }
        obj.update(extra)
        if self.p.obfuscation and choice is not None:
            # Random padding, so a chunk's size does not tell an observer its token (OpenAI).
            obj["obfuscation"] = secrets.token_urlsafe(12)[: 1 + secrets.randbelow(16)]
        return b"data: " + dumps(obj).encode() + b"\n\n"

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
            logprobs = self.render.render(fmt, lps, self.offsets[index], echo)
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

    def _openings(self) -> list[bytes]:
        """Each choice's role chunk (chat) and echoed prompt, before any token."""
        chat = self.p.kind == "chat"
        chunks = []
        for i in range(len(self.choices)):
            if chat:
                extra = {}
                if self.p.return_token_ids and i == 0:
                    extra["prompt_token_ids"] = self.p.prompts[0].ids
                role = {"index": i, "delta": {"role": "assistant", "content": ""}}
                role.update(finish_reason=None, logprobs=None)
                chunks.append(self._chunk(role, **extra))
            echo_text, echo_lps = self._echo(i)
            if echo_text or (not chat and self.p.return_token_ids):
                ids = None if echo_text else []
                choice = self._delta(i, echo_text, echo_lps, ids, echo=bool(echo_text))
                if not chat and self.p.return_token_ids:
                    choice["prompt_token_ids"] = self.p.prompts[i // self.p.n].ids
                chunks.append(self._chunk(choice))
        return chunks

    async def sse(
        self, updates: AsyncIterator[tuple[int, int, ChoiceUpdate]]
    ) -> AsyncIterator[bytes]:
        n_choices = len(self.choices)
        pending_text = [""] * n_choices
        pending_lps: list[list[TokenLogprob]] = [[] for _ in range(n_choices)]
        pending_ids: list[list[int]] = [[] for _ in range(n_choices)]
        tools = self.p.tools if self.p.kind == "chat" else None
        calls = [ToolCallStream(tools.fmt, tools.names) if tools else None for _ in self.choices]
        called = [False] * n_choices

        def content(index: int) -> bytes | None:
            """The chunk of a choice's text (with its tokens' logprobs) not yet sent."""
            if not pending_text[index]:
                return None
            delta = self._delta(index, pending_text[index], pending_lps[index], pending_ids[index])
            pending_text[index], pending_lps[index], pending_ids[index] = "", [], []
            return self._chunk(delta)

        try:
            for chunk in self._openings():
                yield chunk
            async for index, prompt, u in updates:
                self.add(index, prompt, u)
                pending_lps[index] += list(u.logprobs or ())
                pending_ids[index] += list(u.token_ids)
                stream = calls[index]
                if stream is None:
                    events: list[Any] = [ContentDelta(u.text)]
                else:  # text that may open a tool call is held back
                    events = stream.feed(u.text)
                    events += stream.finish() if u.finish_reason is not None else []
                for event in events:
                    if isinstance(event, ContentDelta):
                        pending_text[index] += event.text
                        continue
                    if chunk := content(index):
                        yield chunk
                    called[index] = True
                    yield self._chunk(_tool_call_delta(index, event))
                if chunk := content(index):
                    yield chunk
                if u.finish_reason is not None:
                    lps = pending_lps[index] if pending_lps[index] else None
                    ids = pending_ids[index]
                    reason = _call_reason(called[index], u.finish_reason)
                    choice = self._delta(index, None, lps, ids, finish=reason)
                    if self.p.raw_output:
                        choice["raw_output"] = self._raw_output(index)
                    extra = {"perf_metrics": self.perf_metrics()} if self.p.perf_metrics else {}
                    yield self._chunk(choice, self.usage(), **extra)
                    pending_lps[index], pending_ids[index] = [], []
            if self.p.include_usage:
                yield self._chunk(None, self.usage())
            yield b"data: [DONE]\n\n"
        except ClientGone:
            self.status = 499
        except Exception as e:  # noqa: BLE001 - the client is told, then the stream ends
            if isinstance(e, EngineFailure):
                error = failure_error(e)  # the engine logged its own failure
            else:
                log.exception("request %s: rendering the stream failed", self.id)
                error = internal_error(f"internal error: {e}")
            self.status = error.status
            yield b"data: " + dumps(error.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"


def _call_reason(called: bool, reason: str) -> str:
    """A reply that ended (not cut by max_tokens) after making tool calls: "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason


def _tool_call_delta(index: int, event: ToolCallStart | ArgumentsDelta) -> dict:
    """A streamed tool call: its id, type and name first, then its argument fragments."""
    if isinstance(event, ToolCallStart):
        call = {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
    else:
        call = {"index": event.index, "function": {"arguments": event.fragment}}
    return {
        "index": index,
        "delta": {"tool_calls": [call]},
        "finish_reason": None,
        "logprobs": None,
    }
