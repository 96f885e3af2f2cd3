"""The official `openai` client, sync and async, streaming and not, against a live uvicorn
server over the FakeEngine — a user who points the client at jaxfire changes nothing else."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from serving.app import create_app
from serving.testing import FakeEngine, background_server

M = "fake-model"
FW = f"accounts/fireworks/models/{M}"
REPLY = "Hello! I am a fake café model."
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url():
    with background_server(create_app(FakeEngine(name=M, reply=REPLY), api_key="k")) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def fireworks(url):
    """As the Fireworks docs configure the OpenAI client: /inference/v1 and full names."""
    return openai.OpenAI(base_url=f"{url}/inference/v1", api_key="k", max_retries=0)


def test_chat(client):
    r = client.chat.completions.create(model=M, messages=HI, max_tokens=6, seed=1)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello!"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model=M, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(REPLY.encode()) + 1
    )


def test_completions(client):
    r = client.completions.create(model=M, prompt="The sky is", max_tokens=5, echo=True, logprobs=2)
    assert r.object == "text_completion"
    assert r.choices[0].text == "The sky isHello"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 10 + 5


def test_completions_stream_multiple_prompts(client):
    stream = client.completions.create(model=M, prompt=["a", "b"], n=2, max_tokens=3, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: "Hel", 1: "Hel", 2: "Hel", 3: "Hel"}


def test_chat_logprobs_and_fireworks_fields(client):
    r = client.chat.completions.create(
        model=M,
        messages=HI,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 40, "raw_output": True, "return_token_ids": True, "min_p": 0.05},
    )
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == ["H", "e", "l"]
    assert len(content[0].top_logprobs) == 2
    extra = r.choices[0].model_extra
    assert extra["token_ids"] == list(b"Hel")
    assert extra["raw_output"]["completion_token_ids"] == list(b"Hel")
    assert content[0].model_extra["sampling_logprob"] == -0.25


def test_with_raw_response_reads_sampling_options(fireworks):
    """As the Fireworks documentation shows it."""
    raw = fireworks.chat.completions.with_raw_response.create(model=FW, messages=HI, max_tokens=2)
    options = json.loads(raw.headers.get("fireworks-sampling-options"))
    assert options["temperature"] == 0.2 and options["top_p"] == 0.9  # generation_config
    assert int(raw.headers["fireworks-prompt-tokens"]) > 0
    completion = raw.parse()
    assert completion.model == FW
    assert completion.choices[0].message.content == "He"


def test_fireworks_prefix_streaming_with_raw_response(fireworks):
    with fireworks.chat.completions.with_streaming_response.create(
        model=FW, messages=HI, max_tokens=2, stream=True, temperature=0.9
    ) as response:
        assert json.loads(response.headers["fireworks-sampling-options"])["temperature"] == 0.9
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "He"


def test_errors_map_to_sdk_exceptions(client, url):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=HI, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=HI, extra_body={"foo": 1})
    assert "Extra inputs are not permitted" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="accounts/x/models/nope", messages=HI)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=M, messages=HI)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [M]


def test_async_client(url):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        r = await client.chat.completions.create(model=M, messages=HI, max_tokens=5)
        assert r.choices[0].message.content == "Hello"
        stream = await client.chat.completions.create(
            model=M, messages=HI, max_tokens=5, stream=True, n=2
        )
        texts = {0: "", 1: ""}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        assert texts == {0: "Hello", 1: "Hello"}
        rs = await asyncio.gather(
            *[client.completions.create(model=M, prompt=f"p{i}", max_tokens=4) for i in range(8)]
        )
        assert all(r.choices[0].text == "Hell" for r in rs)
        stream = await client.completions.create(model=M, prompt="x", max_tokens=3, stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == "Hel"
        await client.close()

    asyncio.run(main())
