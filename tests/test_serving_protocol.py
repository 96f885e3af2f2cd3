"""Response shapes, streaming, headers, logprobs, echo, auth, overload and cancellation over
HTTP (docs/sampling.md section 4), against a live uvicorn server over the FakeEngine.

The fake replays "Hello! I am a fake café model." (one byte-level token per byte, then EOS),
so texts and token counts below are exact.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serving.app import create_app
from serving.testing import BOS, EOS, FAIL_MARKER, FakeEngine, background_server

M = "fake-model"
REPLY = "Hello! I am a fake café model."
REPLY_TOKENS = len(REPLY.encode()) + 1  # bytes + EOS
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine():
    return FakeEngine(name=M, reply=REPLY, max_context=2048)


@pytest.fixture(scope="module")
def url(engine):
    with background_server(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def chat(client, **fields):
    r = client.post("/v1/chat/completions", json={"model": M, "messages": HI, **fields})
    assert r.status_code == 200, r.text
    return r


def cmpl(client, **fields):
    r = client.post("/v1/completions", json={"model": M, "prompt": "The sky is", **fields})
    assert r.status_code == 200, r.text
    return r


def sse(client, path, body):
    """(status, headers, parsed chunks, raw data lines) of a streaming request."""
    with client.stream("POST", path, json=body) as r:
        lines = [line for line in r.iter_lines() if line]
        status, headers = r.status_code, r.headers
    assert all(line.startswith("data: ") for line in lines), lines
    data = [line[6:] for line in lines]
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    return status, headers, chunks, data


def metric(client, name):
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ------------------------------------------------------------------------------ chat


def test_chat_completion_shape_and_headers(client):
    r = chat(client)
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == M
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == REPLY
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == REPLY_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert int(r.headers["fireworks-prompt-tokens"]) == usage["prompt_tokens"]
    assert float(r.headers["fireworks-server-time-to-first-token"]) >= 0
    options = json.loads(r.headers["fireworks-sampling-options"])
    # generation_config defaults (temperature 0.2, top_p 0.9) applied and reported
    assert options == {
        "temperature": 0.2,
        "top_k": 0,
        "top_p": 0.9,
        "min_p": 0.0,
        "typical_p": 1.0,
        "max_tokens": 2048 - usage["prompt_tokens"],  # lowered to fit the context window
    }
    assert "perf_metrics" not in body


def test_sampling_options_header_reflects_request(client, engine):
    r = chat(
        client,
        temperature=0.7,
        top_k=20,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        seed=7,
        logit_bias={"65": 5},
        max_tokens=8,
    )
    options = json.loads(r.headers["fireworks-sampling-options"])
    assert options["temperature"] == 0.7 and options["top_k"] == 20
    assert options["top_p"] == 0.9  # still the generation_config default
    assert options["frequency_penalty"] == 0.5 and options["repetition_penalty"] == 1.1
    assert options["seed"] == 7 and options["logit_bias"] == {"65": 5.0}
    assert options["max_tokens"] == 8
    params = engine.submitted[-1].params
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (0.7, 20, 0.9, 7)
    assert params.logit_bias == {65: 5.0}


def test_mirostat_skips_truncation_defaults(client, engine):
    r = chat(client, mirostat_target=3.0)
    options = json.loads(r.headers["fireworks-sampling-options"])
    assert options["top_p"] == 1.0 and options["temperature"] == 0.2
    assert options["mirostat_target"] == 3.0 and options["mirostat_lr"] == 0.1
    assert engine.submitted[-1].params.top_p == 1.0
    r = chat(client, mirostat_target=3.0, top_k=1)
    assert engine.submitted[-1].params.top_k == 1  # explicit values still apply


def test_n_choices_and_usage(client):
    body = chat(client, n=3, max_tokens=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello" for c in body["choices"])
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 15


def test_max_tokens_ignore_eos_and_generation_request(client, engine):
    body = chat(client, max_tokens=50, ignore_eos=True, stop=["zzz"]).json()
    assert body["usage"]["completion_tokens"] == 50
    assert body["choices"][0]["finish_reason"] == "length"
    req = engine.submitted[-1]
    assert req.max_tokens == 50 and req.ignore_eos and req.stop == ("zzz",)
    assert req.top_logprobs is None and not req.prompt_logprobs


def test_default_max_tokens_is_2048(client, engine):
    chat(client)
    assert engine.submitted[-1].max_tokens == 2048
    cmpl(client)
    assert engine.submitted[-1].max_tokens == 2048


def test_stop_string_excluded(client):
    body = chat(client, stop=["fake"]).json()
    assert body["choices"][0]["message"]["content"] == "Hello! I am a "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_template_and_prompt_tokens(client, engine):
    body = chat(client, raw_output=True, messages=[{"role": "system", "content": "S"}, *HI])
    raw = body.json()["choices"][0]["raw_output"]
    text = engine.tokenizer.decode(raw["prompt_token_ids"], skip_special_tokens=False)
    turns = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert text == turns + "<|im_start|>assistant\n"
    assert raw["prompt_fragments"] == [text]


def test_new_logprobs_format(client):
    body = chat(client, logprobs=True, top_logprobs=3).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    keys = {"token", "logprob", "sampling_logprob", "bytes", "token_id", "text_offset"}
    for e in content:
        assert keys | {"top_logprobs"} == set(e)
        assert len(e["top_logprobs"]) == 3
        assert all(set(t) == {"token", "logprob", "token_id", "bytes"} for t in e["top_logprobs"])
        assert e["logprob"] <= 0
    # -inf is written as -9999.0
    assert content[0]["top_logprobs"][2]["logprob"] == -9999.0
    # the bytes of the tokens concatenate to the content (é spans two tokens)
    raw = b"".join(bytes(e["bytes"]) for e in content if e["token_id"] != EOS)
    assert raw.decode() == choice["message"]["content"]
    offsets = [e["text_offset"] for e in content]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert content[-1]["token_id"] == EOS


def test_logprobs_true_without_top_logprobs(client, engine):
    body = chat(client, logprobs=True, max_tokens=4).json()
    assert all(e["top_logprobs"] == [] for e in body["choices"][0]["logprobs"]["content"])
    assert engine.submitted[-1].top_logprobs == 0


def test_legacy_logprobs_on_completions(client):
    body = cmpl(client, logprobs=3, max_tokens=6).json()
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert n == 6
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"):
        assert len(lp[key]) == n
    assert all(len(d) <= 4 for d in lp["top_logprobs"])
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert lp["top_logprobs"][0]["y"] == -9999.0
    assert "".join(lp["tokens"]) == body["choices"][0]["text"] == "Hello!"
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]


def test_integer_logprobs_on_chat_is_legacy(client):
    body = chat(client, logprobs=2, max_tokens=3).json()
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"}
    assert lp["tokens"] == ["H", "e", "l"]


def test_top_logprobs_wins_over_integer_logprobs(client, engine):
    chat(client, logprobs=1, top_logprobs=4, max_tokens=1)
    assert engine.submitted[-1].top_logprobs == 4


def test_echo_with_logprobs(client, engine):
    body = cmpl(client, echo=True, max_tokens=0, logprobs=0).json()
    choice = body["choices"][0]
    assert choice["text"] == "The sky is"
    assert body["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    # The fake adds a BOS that is not echoed, so the first echoed token has a context.
    assert engine.submitted[-1].prompt_ids[0] == BOS and engine.submitted[-1].prompt_logprobs
    assert len(lp["tokens"]) == len("The sky is")
    assert all(x is not None for x in lp["token_logprobs"])
    # A token-id prompt has no BOS: its first token has no conditional logprob.
    ids = list(b"The sky")
    body = cmpl(client, prompt=ids, echo=True, max_tokens=2, logprobs=0).json()
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == "The skyHe"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None for x in lp["token_logprobs"][1:])
    assert lp["token_ids"] == ids + [ord("H"), ord("e")]
    assert lp["text_offset"][: len(ids) + 1] == list(range(len(ids) + 1))
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_echo_last(client):
    body = cmpl(client, echo_last=2, max_tokens=0, logprobs=0).json()
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == "is"
    assert len(lp["tokens"]) == 2 and all(x is not None for x in lp["token_logprobs"])
    full = cmpl(client, echo=True, max_tokens=0, logprobs=0).json()
    last = cmpl(client, echo_last=10**6, max_tokens=0, logprobs=0).json()
    assert full["choices"][0]["text"] == last["choices"][0]["text"] == "The sky is"
    assert full["choices"][0]["logprobs"] == last["choices"][0]["logprobs"]


def test_echo_without_logprobs_and_chat_echo(client):
    body = cmpl(client, echo=True, max_tokens=3).json()
    assert body["choices"][0]["text"] == "The sky isHel"
    assert body["choices"][0]["logprobs"] is None
    body = chat(client, echo=True, max_tokens=2, logprobs=True).json()
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("<|im_start|>") and content.endswith("assistant\nHe")
    entries = body["choices"][0]["logprobs"]["content"]
    assert entries[0]["logprob"] is None and entries[0]["top_logprobs"] == []
    assert len(entries) == body["usage"]["prompt_tokens"] + 2


def test_raw_output(client):
    body = chat(client, raw_output=True, max_tokens=40).json()
    raw = body["choices"][0]["raw_output"]
    assert set(raw) >= {
        "prompt_fragments",
        "prompt_token_ids",
        "completion",
        "completion_token_ids",
        "completion_logprobs",
        "grammar",
    }
    assert len(raw["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert len(raw["completion_token_ids"]) == body["usage"]["completion_tokens"]
    assert raw["completion"] == REPLY + "<|im_end|>"  # special tokens kept
    assert raw["completion_logprobs"] is None
    body = chat(client, raw_output=True, logprobs=True, max_tokens=3).json()
    assert len(body["choices"][0]["raw_output"]["completion_logprobs"]["content"]) == 3


def test_return_token_ids(client):
    body = chat(client, return_token_ids=True, raw_output=True, max_tokens=4).json()
    raw = body["choices"][0]["raw_output"]
    assert body["prompt_token_ids"] == raw["prompt_token_ids"]
    assert body["choices"][0]["token_ids"] == raw["completion_token_ids"] == list(b"Hell")
    body = cmpl(client, return_token_ids=True, max_tokens=2).json()
    assert body["choices"][0]["prompt_token_ids"] == [BOS, *b"The sky is"]
    assert body["choices"][0]["token_ids"] == list(b"He")


def test_perf_metrics(client):
    r = chat(client, perf_metrics_in_response=True, max_tokens=2)
    perf = r.json()["perf_metrics"]
    assert perf["prompt-tokens"] == r.headers["fireworks-prompt-tokens"]
    assert float(perf["server-time-to-first-token"]) >= 0
    assert float(perf["server-processing-time"]) >= float(perf["server-time-to-first-token"])
    assert "fireworks-server-processing-time" in r.headers


def test_prompt_truncate_len_evicts_earliest_turns(client):
    history = [{"role": "system", "content": "SYSTEM"}]
    for i in range(10):
        history += [
            {"role": "user", "content": f"question {i} " + "x" * 20},
            {"role": "assistant", "content": f"answer {i} " + "y" * 20},
        ]
    history.append({"role": "user", "content": "last question"})
    full = chat(client, messages=history, max_tokens=1).json()["usage"]["prompt_tokens"]
    body = chat(client, messages=history, max_tokens=1, prompt_truncate_len=200, raw_output=True)
    body = body.json()
    assert body["usage"]["prompt_tokens"] <= 200 < full
    text = bytes(t for t in body["choices"][0]["raw_output"]["prompt_token_ids"] if t < 256)
    assert b"SYSTEM" in text and b"last question" in text
    assert b"question 0" not in text and b"answer 9" in text


# ----------------------------------------------------------------------- completions


def test_completion_shape(client):
    body = cmpl(client, max_tokens=5).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 1 + len("The sky is")


def test_multiple_prompts_prompt_major(client, engine):
    body = cmpl(client, prompt=["a", "bb"], n=2, max_tokens=1).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2 + 3
    assert body["usage"]["completion_tokens"] == 4
    assert [r.prompt_ids for r in engine.submitted[-2:]] == [(BOS, 97), (BOS, 98, 98)]
    body = cmpl(client, prompt=[[1, 2, 3]], max_tokens=1, echo=True).json()
    assert body["choices"][0]["text"] == "\x01\x02\x03H"


# ------------------------------------------------------------------------- streaming


def test_chat_stream(client):
    body = {"model": M, "messages": HI, "stream": True, "seed": 1}
    status, headers, chunks, data = sse(client, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert json.loads(headers["fireworks-sampling-options"])["temperature"] == 0.2
    assert int(headers["fireworks-prompt-tokens"]) > 0
    assert "fireworks-server-time-to-first-token" in headers
    assert data[-1] == "[DONE]"
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == REPLY
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    usage = finishing[0]["usage"]
    assert usage["completion_tokens"] == REPLY_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # no content delta holds a partial character (é is two tokens)
    assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks)


def test_stream_include_usage_and_n(client):
    body = {
        "model": M,
        "messages": HI,
        "stream": True,
        "n": 2,
        "max_tokens": 7,
        "stream_options": {"include_usage": True},
    }
    _, _, chunks, data = sse(client, "/v1/chat/completions", body)
    assert data[-1] == "[DONE]"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 14
    per_choice = {0: "", 1: ""}
    finishes = {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        per_choice[choice["index"]] += choice["delta"].get("content") or ""
        finishes[choice["index"]] += choice["finish_reason"] is not None
    assert per_choice == {0: "Hello! ", 1: "Hello! "}
    assert finishes == {0: 1, 1: 1}
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing[-1]["usage"] == last["usage"]


def test_stream_continuous_usage_stats(client):
    """vLLM's continuous_usage_stats: every chunk carries the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": M, "messages": HI, "stream": True, "max_tokens": 7, "stream_options": options}
    _, _, chunks, _ = sse(client, "/v1/chat/completions", body)
    assert all(c["usage"] is not None for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 7
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] for c in chunks)


def test_stream_obfuscation(client):
    """include_obfuscation pads each streamed choice chunk with a random field (OpenAI)."""
    body = {"model": M, "messages": HI, "stream": True, "max_tokens": 7}
    padded = {**body, "stream_options": {"include_obfuscation": True}}
    _, _, chunks, _ = sse(client, "/v1/chat/completions", padded)
    assert all(isinstance(c["obfuscation"], str) and c["obfuscation"] for c in chunks)
    _, _, plain, _ = sse(client, "/v1/chat/completions", body)
    assert not any("obfuscation" in c for c in plain)


def test_stream_stop_string_never_leaks(client):
    body = {"model": M, "messages": HI, "stream": True, "stop": ["fake café"]}
    _, _, chunks, _ = sse(client, "/v1/chat/completions", body)
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(deltas) == "Hello! I am a "
    assert not any("f" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream(client):
    body = {"model": M, "prompt": "x", "stream": True, "max_tokens": 5, "logprobs": 1}
    _, _, chunks, data = sse(client, "/v1/completions", body)
    assert data[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello"
    tokens = [
        t
        for c in chunks
        if c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["tokens"]
    ]
    assert tokens == list("Hello")
    offsets = [
        o
        for c in chunks
        if c["choices"][0]["logprobs"]
        for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == [0, 1, 2, 3, 4]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_stream_logprobs_token_ids_raw_output_perf(client):
    body = {
        "model": M,
        "messages": HI,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 1,
        "return_token_ids": True,
        "raw_output": True,
        "perf_metrics_in_response": True,
    }
    _, _, chunks, _ = sse(client, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"][0] == 258  # <|im_start|>
    entries = [
        e
        for c in chunks
        if c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    ids = [t for c in chunks for t in c["choices"][0].get("token_ids") or []]
    assert len(entries) == len(ids) == REPLY_TOKENS
    assert [e["token_id"] for e in entries] == ids
    final = chunks[-1]
    assert final["choices"][0]["raw_output"]["completion_token_ids"] == ids
    assert final["perf_metrics"]["prompt-tokens"] == str(final["usage"]["prompt_tokens"])


def test_stream_echo(client):
    body = {"model": M, "prompt": "Q:", "stream": True, "echo": True, "max_tokens": 2}
    _, _, chunks, _ = sse(client, "/v1/completions", body)
    assert chunks[0]["choices"][0]["text"] == "Q:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Q:He"


def test_error_mid_stream(client):
    body = {"model": M, "messages": [{"role": "user", "content": FAIL_MARKER}], "stream": True}
    status, _, chunks, data = sse(client, "/v1/chat/completions", body)
    assert status == 200
    assert data[-1] == "[DONE]"
    assert "error" in chunks[-1] and chunks[-1]["error"]["message"]
    body["stream"] = False
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"


# ------------------------------------------------------------- cancellation and limits


def _wait_idle(client, engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(client, "jaxfire_active_slots") == 0 and not engine.handles:
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_the_slot(url, engine):
    slow = FakeEngine(name=M, token_delay_s=0.005)
    with background_server(create_app(slow)) as slow_url, httpx.Client(base_url=slow_url) as c:
        body = {"model": M, "messages": HI, "stream": True, "max_tokens": 5000, "ignore_eos": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert metric(c, "jaxfire_active_slots") == 1
            handle = next(iter(slow.handles))
        assert _wait_idle(c, slow)
        assert handle.cancelled
        assert metric(c, "jaxfire_requests_cancelled_total") == 1
        assert metric(c, "jaxfire_requests_in_flight") == 0

        # a non-streaming request whose client gives up is cancelled too
        body["stream"] = False
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body, timeout=0.3)
        assert _wait_idle(c, slow)
        assert metric(c, "jaxfire_requests_cancelled_total") == 2


def test_overloaded_is_503_with_retry_after(client, engine):
    r = client.post(
        "/v1/completions",
        json={"model": M, "prompt": ["a", "b", "c"], "n": 128, "max_tokens": 1},
    )
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"]
    assert _wait_idle(client, engine)  # the two admitted prompts were cancelled


def test_api_key():
    with background_server(create_app(FakeEngine(name=M), api_key="sekrit")) as url:
        with httpx.Client(base_url=url) as c:
            body = {"model": M, "messages": HI, "max_tokens": 1}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer no"})
            assert r.status_code == 401
            assert c.get("/v1/models").status_code == 401
            ok = {"Authorization": "Bearer sekrit"}
            assert c.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.get("/health").status_code == 200


def test_fireworks_prefix_and_model_names(client):
    name = f"accounts/fireworks/models/{M}"
    for path in ("/inference/v1/chat/completions", "/v1/chat/completions"):
        r = client.post(path, json={"model": name, "messages": HI, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == name
    r = client.post("/inference/v1/completions", json={"model": M, "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200
    assert client.get("/inference/v1/models").json()["data"][0]["id"] == M
    r = client.post(
        "/v1/chat/completions", json={"model": "accounts/fireworks/models/other", "messages": HI}
    )
    assert r.status_code == 404


def test_models_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0] == {
        "id": M,
        "object": "model",
        "created": models["data"][0]["created"],
        "owned_by": "jaxfire",
        "context_length": 2048,
    }
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_slots"] == 64
    chat(client, max_tokens=3)
    text = client.get("/metrics").text
    for name in (
        "jaxfire_requests_total",
        "jaxfire_prompt_tokens_total",
        "jaxfire_generation_tokens_total",
        "jaxfire_time_to_first_token_seconds_bucket",
        "jaxfire_inter_token_latency_seconds_count",
        "jaxfire_queue_length",
        "jaxfire_slot_occupancy_ratio",
    ):
        assert name in text
    assert metric(client, "jaxfire_generation_tokens_total") > 0
    assert metric(client, "jaxfire_inter_token_latency_seconds_count") > 0
    assert 'jaxfire_requests_total{endpoint="chat",status="200"}' in text


def test_a_failing_submit_is_a_logged_counted_500(caplog):
    """An engine that raises something other than a refusal: one traceback in the log, a
    500 envelope, an access line and the request counted (not a crash of the app)."""
    import logging

    class Broken(FakeEngine):
        def submit(self, request):
            raise RuntimeError("injected submit fault")

    caplog.set_level(logging.INFO)
    app = create_app(Broken(name=M))
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": M, "messages": HI})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error"
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].name == "jaxfire.server"
    assert any(
        " 500 " in rec.getMessage() for rec in caplog.records if rec.name == "jaxfire.access"
    )
    assert 'jaxfire_requests_total{endpoint="chat",status="500"} 1' in app.state.metrics.render({})
