"""Structured output and tool calls end to end: the official openai client against a live
server over the real engine and the default model (SmolLM2-135M, no tool template of its own).
Every reply is checked from outside: json.loads + jsonschema, the GBNF language, the tool's
parameters schema; hostile inputs get a 400 and the server carries on."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from serving.app import create_app
from serving.testing import background_server
from tests.structured_schemas import HOSTILE, SCHEMAS

pytestmark = pytest.mark.slow

M = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Describe a small red fruit as JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
        },
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
TOOLS_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def url():
    api = pytest.importorskip("engine.api")
    engine = api.Engine.from_pretrained(M, max_slots=8, max_len=1024)
    with background_server(create_app(engine)) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


class Fruit(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    color: str = pydantic.Field(max_length=12)
    grams: int = pydantic.Field(ge=0, le=1000)


def test_openai_parse_returns_the_pydantic_object(oai):
    r = oai.chat.completions.parse(
        model=M, messages=ASK, response_format=Fruit, temperature=0, max_tokens=120
    )
    fruit = r.choices[0].message.parsed
    assert isinstance(fruit, Fruit) and 0 <= fruit.grams <= 1000
    assert r.choices[0].finish_reason == "stop"


def _schema_reply(oai, name: str, schema) -> tuple[str, str]:
    r = oai.chat.completions.create(
        model=M,
        messages=ASK,
        temperature=0,
        max_tokens=220,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
    )
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_json_schema_replies_validate(oai):
    bounded = [(n, s) for n, s, *_ in SCHEMAS if n not in ("recursive_tree", "additional_schema")]
    assert len(bounded) >= 30
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # constrained rows batch together
        replies = list(pool.map(lambda ns: _schema_reply(oai, *ns), bounded))
    for (name, schema), (text, reason) in zip(bounded, replies, strict=True):
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_completions(oai):
    r = oai.chat.completions.create(
        model=M, messages=ASK, response_format={"type": "json_object"}, max_tokens=300, seed=3
    )
    if r.choices[0].finish_reason == "stop":  # an open-ended object may run past max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = oai.completions.create(
        model=M,
        prompt="A JSON object with a name:",
        max_tokens=60,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": Fruit.model_json_schema()},
            }
        },
    )
    Fruit.model_validate_json(c.choices[0].text)


GBNF = """root ::= "The diagnosis is " diagnosis "."
diagnosis ::= "arthritis" | "dengue" | "urinary tract infection" | "common cold"
"""


def test_gbnf_grammar_is_matched(oai):
    r = oai.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "I have a fever and joint pain."}],
        extra_body={"response_format": {"type": "grammar", "grammar": GBNF}},
        max_tokens=30,
        temperature=0.7,
        seed=11,
    )
    text = r.choices[0].message.content
    assert text in {
        f"The diagnosis is {d}."
        for d in ("arthritis", "dengue", "urinary tract infection", "common cold")
    }


@pytest.mark.parametrize("name, rf, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_response_format_is_a_400(url, name, rf, words):
    body = {"model": M, "messages": ASK, "max_tokens": 4, "response_format": rf}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and words in error["message"], error


def test_serving_goes_on_after_hostile_input(oai):
    r = oai.chat.completions.create(model=M, messages=ASK, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def _calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMS[call.function.name])
        out.append((call.function.name, arguments))
    return out


@pytest.mark.parametrize(
    "choice", ["required", "any", {"type": "function", "function": {"name": "get_time"}}]
)
def test_forced_tool_calls_parse_and_validate(oai, choice):
    r = oai.chat.completions.create(
        model=M,
        messages=TOOLS_ASK,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    calls = _calls(r.choices[0].message)
    assert len(calls) == 1
    if isinstance(choice, dict):
        assert calls[0][0] == "get_time"


def test_streamed_tool_calls_assemble_to_the_reply(oai):
    kw = dict(model=M, messages=TOOLS_ASK, tools=[WEATHER, TIME], tool_choice="required")
    # One call: allowed more, this small model at temperature 0 calls again and again.
    kw.update(temperature=0, max_tokens=160, parallel_tool_calls=False)
    whole = oai.chat.completions.create(**kw)
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in oai.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for t in delta.tool_calls or ():
            call = calls.setdefault(t.index, {"name": "", "arguments": ""})
            if t.id:
                call["id"], call["name"] = t.id, t.function.name
            call["arguments"] += t.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert reason == whole.choices[0].finish_reason == "tool_calls"
    assert (content or None) == whole.choices[0].message.content
    expected = [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected


def test_a_tool_result_turn(oai):
    first = oai.chat.completions.create(
        model=M,
        messages=TOOLS_ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *TOOLS_ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = oai.chat.completions.create(
        model=M, messages=messages, tools=[WEATHER], temperature=0, max_tokens=30
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"not": {}}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tool_choice",
        ),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400s(url, fields, param):
    body = {"model": M, "messages": TOOLS_ASK, "max_tokens": 4, "tools": [WEATHER], **fields}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
