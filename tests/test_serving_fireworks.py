"""The official `fireworks-ai` Python client against a live server, unchanged but for its
base URL: chat, completions, streaming, Fireworks-only fields and the sampling header."""

from __future__ import annotations

import json

import pytest

from serving.app import create_app
from serving.testing import FakeEngine, background_server

fireworks = pytest.importorskip("fireworks")

M = "fake-model"
REPLY = "Hello from the fake model."
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client():
    with background_server(create_app(FakeEngine(name=M, reply=REPLY), api_key="k")) as url:
        yield fireworks.Fireworks(api_key="k", base_url=url, max_retries=0)


def test_chat_with_fireworks_model_name(client):
    r = client.chat.completions.create(
        model=f"accounts/fireworks/models/{M}", messages=HI, max_tokens=100, top_k=40
    )
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sampling_options_header_via_raw_response(client):
    raw = client.chat.completions.with_raw_response.create(
        model=M, messages=HI, max_tokens=4, min_p=0.1
    )
    options = json.loads(raw.headers["fireworks-sampling-options"])
    assert options["min_p"] == 0.1 and "temperature" in options
    assert int(raw.headers["fireworks-prompt-tokens"]) > 0
    assert raw.parse().choices[0].finish_reason == "length"


def test_streaming_chat(client):
    chunks = list(client.chat.completions.create(model=M, messages=HI, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].usage.completion_tokens > 0


def test_completions_with_raw_output_and_perf_metrics(client):
    r = client.completions.create(
        model=M, prompt="The sky is", max_tokens=3, raw_output=True, perf_metrics_in_response=True
    )
    choice = r.choices[0]
    raw = choice.raw_output
    raw = raw if isinstance(raw, dict) else raw.model_dump()
    assert len(raw["prompt_token_ids"]) == r.usage.prompt_tokens
    assert len(raw["completion_token_ids"]) == r.usage.completion_tokens == 3
    metrics = r.perf_metrics if isinstance(r.perf_metrics, dict) else r.perf_metrics.model_dump()
    assert "prompt-tokens" in json.dumps(metrics)


def test_bad_field_is_a_400_the_client_raises(client):
    with pytest.raises(fireworks.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=HI, temperature=3.5)
    assert "temperature" in str(e.value)
