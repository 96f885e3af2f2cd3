"""End to end: the HTTP server over the real engine and the default model (SmolLM2-135M).

Effect tests — each field changes what the model produces the way docs/sampling.md says — through
the official openai client and raw HTTP against a live uvicorn server. The model is loaded
once for the module (slow: loads and compiles the default model).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serving.app import create_app
from serving.testing import background_server

pytestmark = pytest.mark.slow

M = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    api = pytest.importorskip("engine.api")
    eng = api.Engine.from_pretrained(M, max_slots=8, max_len=512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine):
    with background_server(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def cmpl(http, **fields):
    r = http.post("/v1/completions", json={"model": M, "prompt": PROMPT, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def ids(body, i=0):
    return body["choices"][i]["token_ids"]


def greedy(http, n_tokens=12):
    return ids(cmpl(http, temperature=0, max_tokens=n_tokens, return_token_ids=True))


def test_header_shows_generation_config_defaults(oai):
    raw = oai.chat.completions.with_raw_response.create(model=M, messages=HI, max_tokens=4)
    options = json.loads(raw.headers["fireworks-sampling-options"])
    assert options["temperature"] == 0.2 and options["top_p"] == 0.9
    assert options["top_k"] == 0 and options["min_p"] == 0.0 and options["typical_p"] == 1.0
    assert options["max_tokens"] == 4
    assert raw.parse().usage.completion_tokens <= 4


def test_temperature_zero_is_deterministic_and_n_copies(http):
    a = greedy(http)
    assert greedy(http) == a
    body = cmpl(http, temperature=0, max_tokens=12, n=3, return_token_ids=True)
    assert len(body["choices"]) == 3
    assert all(ids(body, i) == a for i in range(3))


def test_top_k_1_min_p_1_top_p_0_equal_greedy(http):
    g = greedy(http)
    fields = dict(temperature=1.0, max_tokens=12, return_token_ids=True, seed=5)
    assert ids(cmpl(http, top_k=1, **fields)) == g
    assert ids(cmpl(http, min_p=1.0, **fields)) == g
    assert ids(cmpl(http, top_p=0, **fields)) == g
    assert (
        ids(cmpl(http, top_k=1, mirostat_target=3.0, **fields)) == g
    )  # docs/sampling.md, binding decision 2


def test_seeds_reproduce(http):
    fields = dict(temperature=1.0, top_p=1.0, max_tokens=48, return_token_ids=True)
    a = ids(cmpl(http, seed=42, **fields))
    assert ids(cmpl(http, seed=42, **fields)) == a
    assert ids(cmpl(http, seed=43, **fields)) != a
    assert ids(cmpl(http, seed=42, repetition_penalty=1.0, **fields)) == a


def test_logit_bias_forces_a_token(http, engine):
    x = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    body = cmpl(http, temperature=0, max_tokens=8, logit_bias={str(x): 100}, return_token_ids=True)
    assert ids(body) == [x] * 8
    assert body["choices"][0]["finish_reason"] == "length"


def test_ignore_eos_gives_exactly_max_tokens(oai):
    r = oai.chat.completions.create(
        model=M, messages=HI, max_tokens=50, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 50
    assert r.choices[0].finish_reason == "length"


def test_natural_eos(http):
    r = http.post(
        "/v1/chat/completions",
        json={"model": M, "messages": HI, "temperature": 0, "max_tokens": 200, "raw_output": True},
    )
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert "<|im_end|>" not in choice["message"]["content"]
        assert choice["raw_output"]["completion"].endswith("<|im_end|>")


def test_stop_string(http):
    text = cmpl(http, temperature=0, max_tokens=12)["choices"][0]["text"]
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:3]
    body = cmpl(http, temperature=0, max_tokens=12, stop=[stop])
    assert body["choices"][0]["text"] == text[: text.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_echo_and_raw_output(http):
    body = cmpl(http, echo=True, max_tokens=0, logprobs=0, raw_output=True)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT
    assert body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert len(choice["raw_output"]["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    last = cmpl(http, echo_last=2, max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
    assert len(last["tokens"]) == 2 and all(x is not None for x in last["token_logprobs"])
    assert last["token_logprobs"] == lp["token_logprobs"][-2:]


def test_chat_raw_output_and_token_ids(oai):
    r = oai.chat.completions.create(
        model=M,
        messages=HI,
        max_tokens=6,
        temperature=0,
        extra_body={"raw_output": True, "return_token_ids": True},
    )
    raw = r.choices[0].model_extra["raw_output"]
    assert len(raw["prompt_token_ids"]) == r.usage.prompt_tokens
    assert r.model_extra["prompt_token_ids"] == raw["prompt_token_ids"]
    assert r.choices[0].model_extra["token_ids"] == raw["completion_token_ids"]
    assert len(raw["completion_token_ids"]) == r.usage.completion_tokens


def test_greedy_logprobs(oai):
    r = oai.chat.completions.create(
        model=M, messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3
        assert abs(e.logprob - max(t.logprob for t in e.top_logprobs)) < 1e-4
        assert e.model_extra["sampling_logprob"] == 0.0
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert text.startswith(r.choices[0].message.content)


def test_stream_equals_non_stream(oai):
    fields = dict(model=M, messages=HI, max_tokens=16, seed=9, temperature=0.8)
    full = oai.chat.completions.create(**fields).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **fields))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def test_context_window(http, engine):
    prompt = list(range(1000, 1400))  # 400 tokens of a 512 window
    body = cmpl(http, prompt=prompt, max_tokens=512, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 512 - 400
    assert body["choices"][0]["finish_reason"] == "length"
    r = http.post(
        "/v1/completions",
        json={
            "model": M,
            "prompt": prompt,
            "max_tokens": 200,
            "context_length_exceeded_behavior": "error",
        },
    )
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": M, "prompt": list(range(1000, 1600))})
    assert r.status_code == 400


def test_disconnect_frees_the_slot(http):
    body = {"model": M, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if "jaxfire_active_slots 0" in text:
            break
        time.sleep(0.1)
    assert "jaxfire_active_slots 0" in text
    assert "jaxfire_requests_cancelled_total 1" in text


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def reused_tokens(http) -> float:
    return metric(http, "jaxfire_prompt_tokens_reused_total")


def test_chats_sharing_a_system_prompt_reuse_its_cache(http):
    """The chat template's system prompt, ~30 tokens, is prefilled once; later chats map
    its full KV pages from the prefix cache (pages of 16 tokens on CPU)."""
    before = reused_tokens(http)
    deadline = time.monotonic() + 300
    question = 0
    while reused_tokens(http) == before and time.monotonic() < deadline:
        question += 1
        messages = [{"role": "user", "content": f"Question {question}: name a colour."}]
        body = {"model": M, "messages": messages, "max_tokens": 2, "perf_metrics_in_response": True}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    reused = reused_tokens(http) - before
    page = metric(http, "jaxfire_kv_page_size")
    assert reused >= page and reused % page == 0
    # The request that reused them says so, as OpenAI's and Fireworks' usage do.
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": reused}
    assert r.json()["perf_metrics"]["cached-prompt-tokens"] == str(int(reused))


def test_programs_pending_gauge_counts_down_to_zero_while_idle(http):
    """Warm-up leaves programs to compile in the background while idle; /metrics counts them."""
    deadline = time.monotonic() + 300
    while metric(http, "jaxfire_programs_pending") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert metric(http, "jaxfire_programs_pending") == 0
