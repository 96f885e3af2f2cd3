"""Test doubles for the server: a byte-level FakeTokenizer, a scripted FakeEngine with the
Engine API (submit → handle → ChoiceUpdates), and a uvicorn server in a background thread.

The fake honours what the HTTP layer must pass through (n, max_tokens, stop, ignore_eos,
logprobs, prompt logprobs, context overflow, cancellation, overload) but does not sample:
every choice replays the same reply text, one byte-level token per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from engine.admission import Limits, check_request
from engine.requests import (
    ChoiceUpdate,
    EngineError,
    EngineOverloaded,
    GenerationRequest,
    Timing,
    TokenLogprob,
)

BOS, EOS, IM_START = 256, 257, 258
SPECIALS = {"<s>": BOS, "<|im_end|>": EOS, "<|im_start|>": IM_START}
SPECIAL_TEXT = {v: k for k, v in SPECIALS.items()}
FAIL_MARKER = "<<fail-midstream>>"


class FakeTokenizer:
    """Bytes are tokens 0..255, plus three special tokens; a ChatML-like template."""

    hf = None
    chat_template = None  # ChatML-like, in render_chat; no tools of its own
    eos_token_ids = frozenset({EOS})
    bos_token_id = BOS
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        i = 0
        while i < len(text):
            for s, t in SPECIALS.items():
                if text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                ids.extend(text[i].encode())
                i += 1
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in ids:
            if t < 256:
                out.append(t)
            elif t in SPECIAL_TEXT and not skip_special_tokens:
                out += SPECIAL_TEXT[t].encode()
        return out.decode("utf-8", "replace")

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        options: dict | None = None,
    ) -> str:
        if tools is not None:
            raise ValueError("this template renders no tools")
        if options and options.get("fail"):
            raise ValueError("the template failed on an option")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if messages and messages[0]["role"] == "bad-role-for-tests":
            raise ValueError("template failure")
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, options: dict | None = None
    ) -> list[int]:
        text = self.render_chat(messages, tools=tools, options=options)
        return self.encode(text, add_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in SPECIAL_TEXT

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return SPECIAL_TEXT.get(token_id, "").encode()


class FakeHandle:
    def __init__(self, engine: FakeEngine, request: GenerationRequest, max_tokens: int):
        self.engine = engine
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0
        self.max_tokens = max_tokens
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.timing: Timing | None = None
        self.cancelled = False
        self.active = request.n
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.handles.discard(self)  # a real engine frees the slots at its next step

    def _logprob(self, token: int) -> TokenLogprob:
        k = self.request.top_logprobs or 0
        alts = [(token, -0.5), (ord("x"), -1.5), (ord("y"), float("-inf")), (ord("z"), -3.0)]
        alts += [(ord("a") + i, -4.0 - i) for i in range(8)]
        greedy = self.request.params.temperature < 1e-5
        return TokenLogprob(token, -0.5, 0.0 if greedy else -0.25, tuple(alts[:k]))

    async def __aiter__(self) -> AsyncIterator[ChoiceUpdate]:
        engine, req = self.engine, self.request
        try:
            if req.prompt_logprobs:
                first = TokenLogprob(req.prompt_ids[0], None, None, ())
                rest = [
                    TokenLogprob(t, -1.0, None, ((t, -1.0),) + ((ord("q"), -2.0),))
                    for t in req.prompt_ids[1:]
                ]
                self.prompt_logprobs = (first, *rest)
            fail = FAIL_MARKER.encode() in bytes(t for t in req.prompt_ids if t < 256)
            reply = list(engine.reply.encode())
            choices = [_FakeChoice() for _ in range(req.n)]
            if self.max_tokens == 0:
                for i in range(req.n):
                    yield ChoiceUpdate(i, (), "", None, "length")
                return
            t_first = None
            step = 0
            while any(c.finish is None for c in choices):
                await asyncio.sleep(engine.token_delay_s)
                if self.cancelled:
                    return
                if fail and step == 3:
                    raise EngineError("the fake engine failed mid-stream")
                for i, c in enumerate(choices):
                    if c.finish is not None:
                        continue
                    pos = len(c.ids)
                    if pos < len(reply) or req.ignore_eos:
                        token = reply[pos % len(reply)]
                    else:
                        token = EOS
                    c.ids.append(token)
                    text_before = c.text
                    c.text = engine.tokenizer.decode(c.ids)
                    if c.text.endswith("\ufffd"):
                        c.text = text_before  # hold a partial character
                        delta = ""
                    else:
                        delta = c.text[len(c.emitted) :]
                    finish = None
                    if token == EOS and not req.ignore_eos:
                        finish = "stop"
                    for s in req.stop:
                        at = c.text.find(s)
                        if at >= 0:
                            finish = "stop"
                            delta = c.text[len(c.emitted) : at]
                            break
                    else:
                        # Hold back text that could be the start of a stop string.
                        hold = max((len(s) - 1 for s in req.stop), default=0)
                        if hold and finish is None and len(c.ids) < self.max_tokens:
                            safe = max(len(c.emitted), len(c.text) - hold)
                            delta = c.text[len(c.emitted) : safe]
                    if finish is None and len(c.ids) >= self.max_tokens:
                        finish = "length"
                        delta = c.text[len(c.emitted) :]
                    c.emitted += delta
                    c.finish = finish
                    lps = (self._logprob(token),) if req.top_logprobs is not None else None
                    if t_first is None:
                        t_first = time.perf_counter()
                    yield ChoiceUpdate(i, (token,), delta, lps, finish)
                step += 1
            now = time.perf_counter()
            self.timing = Timing(0.0, (t_first or now) - self.submitted, now - (t_first or now))
        finally:
            engine.handles.discard(self)


@dataclasses.dataclass
class _FakeChoice:
    ids: list = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: str = ""
    finish: str | None = None


class FakeEngine:
    """The Engine API over a script: every choice replays `reply` then EOS."""

    def __init__(
        self,
        name: str = "fake-model",
        reply: str = "Hello! I am a fake café model.",
        max_context: int = 512,
        max_slots: int = 64,
        max_queue: int = 256,
        token_delay_s: float = 0.0005,
        generation_config: dict | None = None,
    ):
        self.name = name
        self.reply = reply
        self.tokenizer = FakeTokenizer()
        self.vocab_size = 272  # padded past the tokenizer, like real checkpoints
        self.max_context = max_context
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_top_logprobs = 5
        self.limits = Limits(self.vocab_size, max_context, self.max_top_logprobs, 64)
        self.token_delay_s = token_delay_s
        self.generation_config = (
            {"temperature": 0.2, "top_p": 0.9, "eos_token_id": EOS}
            if generation_config is None
            else generation_config
        )
        self.handles: set[FakeHandle] = set()
        self.submitted: list[GenerationRequest] = []

    def submit(self, request: GenerationRequest) -> FakeHandle:
        max_tokens = check_request(request, self.limits)  # the real engine's admission
        if sum(h.active for h in self.handles) + request.n > self.max_queue:
            raise EngineOverloaded("the request queue is full; retry later")
        self.submitted.append(request)
        handle = FakeHandle(self, request, max_tokens)
        self.handles.add(handle)
        return handle

    def stats(self) -> dict:
        active = sum(h.request.n for h in self.handles if not h.cancelled)
        return {
            "queue_length": max(0, active - self.max_slots),
            "active_slots": min(active, self.max_slots),
            "max_slots": self.max_slots,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn on a free port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
