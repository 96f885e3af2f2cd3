"""Tool calling in the server (serving.tool_chat, serving.render): the prompt a request with
tools produces, and a reply with tool calls read back as OpenAI `tool_calls`, streamed and not,
through the official openai client over the FakeEngine (whose reply is a script)."""

from __future__ import annotations

import json

import openai
import pytest

from checkpoints.registry import resolve
from engine.tokenizer import Tokenizer
from serving.app import create_app
from serving.prepare import prepare_chat
from serving.protocol import ChatRequest
from serving.testing import FakeEngine, FakeTokenizer, background_server

M = "fake-model"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ARGS = {"city": "Paris"}
CALL = f"<tool_call>\n{json.dumps({'name': 'get_weather', 'arguments': ARGS})}\n</tool_call>"
REPLY = "Let me look. " + CALL
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def fake():
    return FakeEngine(name=M, reply=REPLY, max_context=4096)


@pytest.fixture(scope="module")
def client(fake):
    with background_server(create_app(fake, api_key="k")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)


def _prompt(fake) -> str:
    return fake.tokenizer.decode(fake.submitted[-1].prompt_ids, skip_special_tokens=False)


def test_auto_reply_with_a_call_becomes_tool_calls(client, fake):
    r = client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER])
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me look."
    [call] = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    prompt = _prompt(fake)  # the default tools prompt: the template renders no tools
    assert "get_weather" in prompt and "<tool_call>" in prompt
    assert fake.submitted[-1].grammar is None  # auto: the model decides


def test_streamed_calls_assemble_to_the_reply(client):
    whole = client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER])
    content, calls, reasons = "", {}, []
    for chunk in client.chat.completions.create(
        model=M, messages=ASK, tools=[WEATHER], stream=True
    ):
        delta = chunk.choices[0].delta
        assert "<tool" not in (delta.content or "")  # held back, never leaked as content
        content += delta.content or ""
        for t in delta.tool_calls or ():
            c = calls.setdefault(t.index, {"name": None, "arguments": ""})
            if t.id:
                assert c["name"] is None and t.type == "function"
                c["name"] = t.function.name
            c["arguments"] += t.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    assert content == whole.choices[0].message.content
    [call] = whole.choices[0].message.tool_calls
    assert list(calls.values()) == [
        {"name": call.function.name, "arguments": call.function.arguments}
    ]


def test_without_tools_or_with_none_the_reply_is_text(client, fake):
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        r = client.chat.completions.create(model=M, messages=ASK, **extra)
        assert r.choices[0].message.content == REPLY and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"
        assert "get_weather" not in _prompt(fake)


def test_forced_choice_sends_a_grammar_naming_tool_choice(client, fake):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", "any", named):
        client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER], tool_choice=choice)
        request = fake.submitted[-1]
        assert request.grammar is not None and request.grammar_field == "tool_choice"


def test_a_tool_exchange_renders_as_hermes_text(client, fake):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = json.dumps(ARGS)
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    client.chat.completions.create(model=M, messages=messages, tools=[WEATHER])
    prompt = _prompt(fake)
    assert CALL in prompt
    assert "<tool_response>\n21 C\n</tool_response>" in prompt


def test_completions_refuse_tools(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="x", extra_body={"tools": [WEATHER]})
    assert e.value.body["param"] == "tools"


class _NativeTokenizer(FakeTokenizer):
    """A template that renders tools itself (it names them, and the <tool_call> tag)."""

    chat_template = "{{ tools }} ... <tool_call>"

    def render_chat(self, messages, add_generation_prompt=True, tools=None, options=None):
        self.seen = (messages, tools)
        return "".join(m["content"] or "" for m in messages)


def test_a_native_template_gets_tools_and_calls_as_objects():
    engine = FakeEngine(name=M)
    engine.tokenizer = _NativeTokenizer()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    body = {
        "model": M,
        "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}],
        "tools": [WEATHER],
    }
    prepared = prepare_chat(ChatRequest.model_validate(body), engine)
    messages, tools = engine.tokenizer.seen
    assert tools == [WEATHER] and messages[0] == ASK[0]
    assert messages[1]["tool_calls"] == [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    ]
    assert prepared.tools.fmt == "hermes" and prepared.tools.names == {"get_weather"}


def test_transformers_renders_tools_through_the_template(tmp_path):
    folder = tmp_path / "tok"
    resolve("smollm2-135m-instruct").open().save_tokenizer(folder)
    tok = Tokenizer.from_dir(folder)
    tok.hf.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    text = tok.render_chat(ASK, tools=[WEATHER])
    assert text.startswith("TOOL get_weather\nuser: Weather in Paris?")


def test_each_of_n_choices_is_parsed_streamed_or_not(client):
    r = client.chat.completions.create(model=M, messages=ASK, tools=[WEATHER], n=2)
    assert [c.finish_reason for c in r.choices] == ["tool_calls"] * 2
    assert all(c.message.tool_calls[0].function.name == "get_weather" for c in r.choices)
    names: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model=M, messages=ASK, tools=[WEATHER], n=2, stream=True
    ):
        for choice in chunk.choices:
            for t in choice.delta.tool_calls or ():
                if t.id:
                    names[choice.index] = t.function.name
    assert names == {0: "get_weather", 1: "get_weather"}
