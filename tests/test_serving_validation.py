"""Request validation over HTTP (docs/sampling.md section 1) and hostile bodies.

Runs against a real uvicorn server over the FakeEngine: every case answers the documented
status with the error envelope of section 5.1, and no body — truncated, huge, deep, badly
typed, not UTF-8 — ever produces a 500 or disturbs a concurrent streaming request.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from serving.app import create_app
from serving.testing import FakeEngine, background_server

M = "fake-model"
V = 272  # the fake engine's logits width
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine():
    return FakeEngine(name=M)


@pytest.fixture(scope="module")
def client(engine):
    with background_server(create_app(engine)) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c


def chat(client, **fields):
    body = {"model": M, "messages": HI, "max_tokens": 4, **fields}
    return client.post("/v1/chat/completions", json=body)


def cmpl(client, **fields):
    body = {"model": M, "prompt": "The sky is", "max_tokens": 4, **fields}
    return client.post("/v1/completions", json=body)


def assert_400(r, param=None, contains=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["object"] == "error"
    assert err["type"] == "invalid_request_error"
    assert err["code"]
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err.get("param") == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


def assert_200(r):
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------- section 6, tests 1-30


def test_01_negative_temperature(client):
    assert_400(chat(client, temperature=-0.1), "temperature")


def test_02_temperature_upper_bound_inclusive(client):
    assert_400(chat(client, temperature=2.01), "temperature")
    assert_200(chat(client, temperature=2.0))


def test_03_temperature_as_string(client):
    assert_400(chat(client, temperature="0.5"), "temperature")


def test_04_top_p_range(client):
    assert_400(chat(client, top_p=1.1), "top_p")
    assert_400(chat(client, top_p=-0.01), "top_p")


def test_05_top_p_zero_accepted(client):
    assert_200(chat(client, top_p=0, seed=1))


def test_06_top_k_zero_accepted(client):
    assert_200(chat(client, top_k=0))


def test_07_top_k_range_and_type(client):
    assert_400(chat(client, top_k=-1), "top_k")
    assert_400(chat(client, top_k=101), "top_k")
    assert_400(chat(client, top_k=1.5), "top_k")
    assert_400(chat(client, top_k=2.0), "top_k")  # strict: integers are JSON integers


def test_08_min_p_range(client):
    assert_400(chat(client, min_p=1.01), "min_p")
    assert_400(chat(client, min_p=-0.1), "min_p")


def test_09_typical_p(client):
    assert_400(chat(client, typical_p=1.5), "typical_p")
    assert_200(chat(client, typical_p=1.0))


def test_10_penalty_ranges(client):
    assert_400(chat(client, frequency_penalty=2.5), "frequency_penalty")
    assert_400(chat(client, presence_penalty=-2.5), "presence_penalty")
    assert_200(chat(client, frequency_penalty=2, presence_penalty=-2))
    assert_200(chat(client, frequency_penalty=-2, presence_penalty=2))


def test_11_repetition_penalty(client):
    assert_400(chat(client, repetition_penalty=0), "repetition_penalty")
    assert_400(chat(client, repetition_penalty=2.5), "repetition_penalty")
    assert_200(chat(client, repetition_penalty=1.0, seed=3))


def test_12_logit_bias_key_not_an_integer(client):
    assert_400(chat(client, logit_bias={"abc": 1}), "logit_bias")


def test_13_logit_bias_id_out_of_vocabulary(client):
    assert_400(chat(client, logit_bias={str(V): 1}), "logit_bias")
    assert_400(chat(client, logit_bias={"-1": 1}), "logit_bias")
    assert_200(chat(client, logit_bias={str(V - 1): 1}))


def test_14_logit_bias_value_range(client):
    assert_400(chat(client, logit_bias={"10": 100.5}), "logit_bias")
    assert_200(chat(client, logit_bias={"10": -100}))


def test_logit_bias_entry_limit(client):
    assert_400(chat(client, logit_bias={str(i): 1 for i in range(65)}), "logit_bias")
    assert_200(chat(client, logit_bias={str(i): 1 for i in range(64)}))


def test_15_top_logprobs_limit(client):
    assert_400(chat(client, logprobs=True, top_logprobs=6), "top_logprobs", "between 0 and 5")
    assert_200(chat(client, logprobs=True, top_logprobs=5))


def test_16_integer_logprobs_limit(client):
    assert_400(chat(client, logprobs=6), "logprobs", "between 0 and 5")
    assert_400(chat(client, logprobs=-1), "logprobs")


def test_17_top_logprobs_needs_logprobs(client):
    assert_400(chat(client, top_logprobs=3), "top_logprobs")
    assert_200(chat(client, top_logprobs=0))


def test_18_n_range(client):
    assert_400(chat(client, n=0), "n")
    assert_400(chat(client, n=129), "n")
    body = assert_200(chat(client, n=128, max_tokens=1))
    assert sorted(c["index"] for c in body["choices"]) == list(range(128))


def test_19_stop_sequences(client):
    assert_400(chat(client, stop=["a", "b", "c", "d", "e"]), "stop")
    assert_400(chat(client, stop=[]), "stop")
    assert_400(chat(client, stop=[""]), "stop")
    assert_400(chat(client, stop=""), "stop")
    assert_200(chat(client, stop="x"))
    assert_200(chat(client, stop=["a", "b", "c", "d"]))


def test_20_max_tokens_aliases_exclusive(client):
    assert_400(chat(client, max_tokens=10, max_completion_tokens=10), "max_tokens")
    body = {"model": M, "messages": HI, "max_completion_tokens": 3}
    assert (
        assert_200(client.post("/v1/chat/completions", json=body))["usage"]["completion_tokens"]
        == 3
    )


def test_21_negative_max_tokens(client):
    assert_400(chat(client, max_tokens=-1), "max_tokens")


def test_22_missing_or_empty_required_fields(client):
    assert_400(chat(client, messages=[]), "messages")
    assert_400(client.post("/v1/chat/completions", json={"model": M}), "messages")
    assert_400(client.post("/v1/chat/completions", json={"messages": HI}), "model")
    assert_400(client.post("/v1/completions", json={"model": M}), "prompt")


def test_23_truncated_json(client):
    r = client.post(
        "/v1/chat/completions",
        content=b'{"model": "fake-model", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_400(r)


def test_24_unknown_field(client):
    err = assert_400(chat(client, foo=1), "foo")
    assert err["message"] == "Extra inputs are not permitted, field: 'foo', value: 1"


def test_25_unknown_model_is_404(client):
    r = chat(client, model="accounts/x/models/does-not-exist")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["message"] == "Model not found, inaccessible, and/or not deployed"
    assert err["param"] == "model"


def test_26_context_length_exceeded_behavior_enum(client):
    assert_400(
        chat(client, context_length_exceeded_behavior="clip"), "context_length_exceeded_behavior"
    )
    assert_200(chat(client, context_length_exceeded_behavior="error"))
    assert_200(chat(client, context_length_exceeded_behavior="truncate"))


def test_27_mirostat_validation(client):
    assert_400(chat(client, mirostat_target=-1), "mirostat_target")
    assert_400(chat(client, mirostat_lr="fast"), "mirostat_lr")
    assert_200(chat(client, mirostat_target=5.0, mirostat_lr=0.1))


def test_28_echo_last_and_prompt_token_range(client):
    assert_400(chat(client, echo_last=-1), "echo_last")
    assert_400(cmpl(client, prompt=[V]), "prompt")
    assert_400(cmpl(client, prompt=[-1]), "prompt")
    assert_400(cmpl(client, prompt=[[1, 2], [V + 5]]), "prompt")
    assert_200(cmpl(client, prompt=[V - 1]))


def test_29_prompt_truncate_len_is_chat_only(client):
    assert_400(cmpl(client, prompt_truncate_len=100), "prompt_truncate_len")
    assert_200(chat(client, prompt_truncate_len=100))
    assert_400(chat(client, prompt_truncate_len=0), "prompt_truncate_len")


def test_30_thinking_and_reasoning_effort(client):
    assert_400(chat(client, thinking={"type": "enabled"}, reasoning_effort="low"), "thinking")


# ------------------------------------------------- every field at and just past its limit

C = 512  # the fake engine's context window
IDS = [7] * 10  # a completion prompt of 10 token ids
BIAS_64 = {str(i): 1 for i in range(64)}
# (endpoint, fields at the limit: must succeed, fields just past it: 400 naming `param`)
LIMITS = [
    ("chat", dict(temperature=0.0), dict(temperature=-0.001), "temperature"),
    ("chat", dict(temperature=2.0), dict(temperature=2.001), "temperature"),
    ("chat", dict(top_p=0.0), dict(top_p=-0.001), "top_p"),
    ("chat", dict(top_p=1.0), dict(top_p=1.001), "top_p"),
    ("chat", dict(top_k=0), dict(top_k=-1), "top_k"),
    ("chat", dict(top_k=100), dict(top_k=101), "top_k"),
    ("chat", dict(min_p=0.0), dict(min_p=-0.001), "min_p"),
    ("chat", dict(min_p=1.0), dict(min_p=1.001), "min_p"),
    ("chat", dict(typical_p=0.0), dict(typical_p=-0.001), "typical_p"),
    ("chat", dict(typical_p=1.0), dict(typical_p=1.001), "typical_p"),
    ("chat", dict(frequency_penalty=-2.0), dict(frequency_penalty=-2.001), "frequency_penalty"),
    ("chat", dict(frequency_penalty=2.0), dict(frequency_penalty=2.001), "frequency_penalty"),
    ("chat", dict(presence_penalty=-2.0), dict(presence_penalty=-2.001), "presence_penalty"),
    ("chat", dict(presence_penalty=2.0), dict(presence_penalty=2.001), "presence_penalty"),
    ("chat", dict(repetition_penalty=1e-6), dict(repetition_penalty=0.0), "repetition_penalty"),
    ("chat", dict(repetition_penalty=2.0), dict(repetition_penalty=2.001), "repetition_penalty"),
    ("chat", dict(mirostat_target=1e-6), dict(mirostat_target=0.0), "mirostat_target"),
    (
        "chat",
        dict(mirostat_target=3.0, mirostat_lr=0.0),
        dict(mirostat_target=3.0, mirostat_lr=-0.001),
        "mirostat_lr",
    ),
    ("chat", dict(seed=-(2**63)), dict(seed=-(2**63) - 1), "seed"),
    ("chat", dict(seed=2**64 - 1), dict(seed=2**64), "seed"),
    ("chat", dict(logit_bias={"0": -100}), dict(logit_bias={"0": -100.01}), "logit_bias"),
    ("chat", dict(logit_bias={str(V - 1): 100}), dict(logit_bias={str(V): 100}), "logit_bias"),
    ("chat", dict(logit_bias={"0": 1}), dict(logit_bias={"-1": 1}), "logit_bias"),
    ("chat", dict(logit_bias=BIAS_64), dict(logit_bias={**BIAS_64, "64": 1}), "logit_bias"),
    ("chat", dict(n=1), dict(n=0), "n"),
    ("chat", dict(n=128, max_tokens=1), dict(n=129, max_tokens=1), "n"),
    ("chat", dict(max_tokens=0), dict(max_tokens=-1), "max_tokens"),
    (
        "chat",
        dict(max_tokens=None, max_completion_tokens=0),
        dict(max_tokens=None, max_completion_tokens=-1),
        "max_completion_tokens",
    ),
    ("chat", dict(stop=["a", "b", "c", "d"]), dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat", dict(stop=["a"]), dict(stop=[]), "stop"),
    ("chat", dict(stop="a"), dict(stop=""), "stop"),
    (
        "chat",
        dict(logprobs=True, top_logprobs=5),
        dict(logprobs=True, top_logprobs=6),
        "top_logprobs",
    ),
    (
        "chat",
        dict(logprobs=True, top_logprobs=0),
        dict(logprobs=True, top_logprobs=-1),
        "top_logprobs",
    ),
    ("cmpl", dict(logprobs=5), dict(logprobs=6), "logprobs"),
    ("cmpl", dict(logprobs=0), dict(logprobs=-1), "logprobs"),
    ("cmpl", dict(echo_last=0), dict(echo_last=-1), "echo_last"),
    ("chat", dict(prompt_truncate_len=1), dict(prompt_truncate_len=0), "prompt_truncate_len"),
    ("cmpl", dict(prompt=[V - 1]), dict(prompt=[V]), "prompt"),
    ("cmpl", dict(prompt=[0]), dict(prompt=[-1]), "prompt"),
    ("cmpl", dict(prompt=[7] * (C - 1)), dict(prompt=[7] * C), "prompt"),
    (
        "cmpl",
        dict(max_tokens=C - len(IDS), context_length_exceeded_behavior="error"),
        dict(max_tokens=C - len(IDS) + 1, context_length_exceeded_behavior="error"),
        "max_tokens",
    ),
    ("chat", dict(verbosity="medium"), dict(verbosity="low"), "verbosity"),
    ("chat", dict(store=False), dict(store=True), "store"),
    (
        "chat",
        dict(stream=True, stream_options={"include_usage": True}),
        dict(stream=False, stream_options={"include_usage": True}),
        "stream_options",
    ),
]


@pytest.mark.parametrize("endpoint, ok, bad, param", LIMITS)
def test_every_field_at_and_past_its_limit(client, endpoint, ok, bad, param):
    send = chat if endpoint == "chat" else cmpl
    base = {"max_tokens": 1} if endpoint == "chat" else {"prompt": IDS, "max_tokens": 1}
    r = send(client, **{**base, **ok})
    assert r.status_code == 200, r.text
    err = assert_400(send(client, **{**base, **bad}), param)
    if err["code"] != "context_length_exceeded":  # that message gives the token counts
        assert param in err["message"], err


# ------------------------------------------------------- neighbours of the section 6 cases


def test_strict_types(client):
    assert_400(chat(client, n=2.0), "n")
    assert_400(chat(client, n="2"), "n")
    assert_400(chat(client, seed=1.5), "seed")
    assert_400(chat(client, max_tokens=True), "max_tokens")
    assert_400(chat(client, stream="true"), "stream")
    assert_400(chat(client, stream=1), "stream")
    assert_400(chat(client, ignore_eos=0), "ignore_eos")
    assert_400(chat(client, echo="yes"), "echo")
    assert_400(chat(client, logprobs=1.0), "logprobs")
    assert_400(chat(client, logprobs="true"), "logprobs")
    assert_400(chat(client, temperature=True), "temperature")
    assert_200(chat(client, temperature=1))  # floats accept JSON integers


def test_null_is_absent(client):
    fields = dict.fromkeys(
        [
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "typical_p",
            "seed",
            "n",
            "stop",
            "logprobs",
            "top_logprobs",
            "logit_bias",
            "mirostat_target",
            "echo",
            "stream",
            "user",
        ]
    )
    assert_200(chat(client, **fields))


def test_openai_sdk_fields_accepted(client):
    assert_200(
        chat(
            client,
            store=False,
            metadata={"k": "v"},
            service_tier="auto",
            parallel_tool_calls=True,
            prompt_cache_key="abc",
            safety_identifier="u1",
            user="someone",
            modalities=["text"],
            verbosity="medium",
            stream_options=None,
            prediction={"type": "content", "content": "hello"},
            tool_choice="none",
            response_format={"type": "text"},
        )
    )
    assert_200(cmpl(client, best_of=1, suffix=None, user="u"))


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"},
            "tool_choice",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"response_format": {"type": "json_object", "strict": True}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "grammar", "grammar": "root ::= 'a'"}}, "response_format"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"best_of": 3, "n": 1}, "best_of"),
    ],
)
def test_unhonourable_fields_rejected(client, fields, param):
    assert_400(chat(client, **fields), param)


def test_completion_only_unhonourable_fields(client):
    assert_400(cmpl(client, suffix="tail"), "suffix")
    assert_400(cmpl(client, best_of=2), "best_of")
    assert_200(cmpl(client, best_of=2, n=2))


def test_image_content_rejected(client):
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
    ]
    err = assert_400(chat(client, messages=[{"role": "user", "content": content}]), "messages")
    assert "image" in err["message"]


def test_chat_template_kwargs(client):
    assert_200(chat(client, chat_template_kwargs={"enable_thinking": False}))
    assert_400(chat(client, chat_template_kwargs={"tools": []}), "chat_template_kwargs")
    assert_400(chat(client, chat_template_kwargs="x"), "chat_template_kwargs")
    assert_400(chat(client, chat_template_kwargs={"fail": True}), "messages")  # the template's


def test_message_shapes(client):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert_200(chat(client, messages=[{"role": "user", "content": parts}]))
    assert_200(chat(client, messages=[{"role": "developer", "content": "be brief"}] + HI))
    assert_400(chat(client, messages=[{"role": "wizard", "content": "x"}]), "messages")
    assert_400(chat(client, messages=[{"role": "user"}]), "messages")
    assert_400(chat(client, messages=[{"role": "user", "content": 5}]), "messages")
    assert_400(chat(client, messages=[{"role": "user", "content": "x", "extra": 1}]), "messages")
    assert_400(chat(client, messages="Hi"), "messages")
    tool_call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    result = {"role": "tool", "tool_call_id": "1", "content": "42"}
    assert_200(chat(client, messages=[*HI, msg, result]))  # a tool exchange replayed
    for bad in (
        {**tool_call, "function": {"name": "f", "arguments": {}}},  # arguments not a string
        {**tool_call, "function": {"name": "f", "arguments": "[1]"}},  # not an object
        {**tool_call, "function": {"name": "f", "arguments": "{"}},  # not JSON
        {"type": "function", "function": {"name": "f", "arguments": "{}"}},  # no id
    ):
        bad_msg = {"role": "assistant", "content": None, "tool_calls": [bad]}
        assert_400(chat(client, messages=[*HI, bad_msg]), "messages")
    assert_400(chat(client, messages=[{**HI[0], "tool_calls": [tool_call]}]), "messages")


def test_prompt_shapes(client):
    assert_200(cmpl(client, prompt=["a", "b"]))
    assert_200(cmpl(client, prompt=[1, 2, 3]))
    assert_200(cmpl(client, prompt=[[1, 2, 3], [4, 5]]))
    for bad in ([], [[]], [1, "a"], [True], [1.5], {"a": 1}, None, 5, [["a"]]):
        assert_400(cmpl(client, prompt=bad), "prompt")


def test_context_window(client, engine):
    long_prompt = list(range(1, 200)) * 3  # 597 tokens > the fake's 512-token window
    r = cmpl(client, prompt=long_prompt)
    err = assert_400(r, contains="maximum context length")
    assert err["code"] == "context_length_exceeded"
    r = cmpl(
        client, prompt=list(range(1, 101)), max_tokens=500, context_length_exceeded_behavior="error"
    )
    assert assert_400(r)["code"] == "context_length_exceeded"
    r = cmpl(client, prompt=list(range(1, 101)), max_tokens=500, ignore_eos=True)
    body = assert_200(r)
    assert body["usage"]["completion_tokens"] == engine.max_context - 100
    assert body["choices"][0]["finish_reason"] == "length"
    options = json.loads(r.headers["fireworks-sampling-options"])
    assert options["max_tokens"] == engine.max_context - 100


# ------------------------------------------------------------------------ hostile bodies

GOOD = {"model": M, "messages": HI, "max_tokens": 2}


def _body(**fields):
    return json.dumps({**GOOD, **fields}).encode()


_HEAD = b'{"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]'
HOSTILE: list[bytes] = [
    b"",
    b"{",
    b"}",
    b"null",
    b"[]",
    b"123",
    b'"a string"',
    b"{'model': 'fake-model'}",
    b'{"model": "fake-model", "messages": [',
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]',
    b'{"model": "fake-model",, "messages": []}',
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], }',
    b'{"model": "\xff\xfe", "messages": []}',
    b"\xff" * 64,
    b"\xc3\x28",
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
    _HEAD + b', "temperature": NaN}',
    _HEAD + b', "top_p": Infinity}',
    _HEAD + b', "top_p": -Infinity}',
    _HEAD + b', "temperature": 1e999}',
    _HEAD + b', "seed": ' + b"9" * 5000 + b"}",
    _body(temperature=10**400),
    _body(seed=10**30),
    _body(seed=-(10**30)),
    _body(n=10**30),
    _body(max_tokens=10**30),
    _body(top_k=10**30),
    _body(echo_last=10**30),
    _body(logprobs=10**30),
    _body(logit_bias={"1" * 5000: 1}),
    _body(logit_bias={"1": 10**400}),
    _body(logit_bias={"1": "x"}),
    _body(logit_bias=[1, 2]),
    _body(logit_bias={str(i): 1 for i in range(5000)}),
    b"[" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    _body(metadata=json.loads("[" * 500 + "]" * 500)),
    _body(prediction=json.loads("[" * 900 + "]" * 900)),
    _body(messages=[{"role": "user", "content": json.loads("[" * 500 + "]" * 500)}]),
    _body(messages="Hi"),
    _body(messages=[1]),
    _body(messages=[None]),
    _body(messages=[{"role": None, "content": "x"}]),
    _body(messages=[{"role": "user", "content": {"text": "x"}}]),
    _body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
    _body(messages=[{"role": "user", "content": [5]}]),
    _body(model=5),
    _body(model=None),
    _body(model=""),
    _body(model=["fake-model"]),
    _body(stop=5),
    _body(stop=[1]),
    _body(stop=[None]),
    _body(stream_options="x"),
    _body(stream_options={"foo": 1}),
    _body(response_format="json"),
    _body(response_format={"type": ["text"]}),
    _body(tools=[{}]),
    _body(tools="all"),
    _body(prompt_truncate_len=-5),
    _body(context_length_exceeded_behavior=None, temperature=[0.5]),
    _body(top_p={"value": 1}),
    _body(user=5),
    _body(**{"": 1}),
    _body(**{"\u0000": 1}),
]


def test_enough_hostile_bodies():
    assert len(HOSTILE) >= 50


def test_hostile_bodies_never_500_and_never_disturb_a_stream(client):
    """Every hostile body is a 4xx with the envelope, while a slow stream runs unharmed."""
    slow = {
        "model": M,
        "messages": HI,
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    result = {}

    def stream() -> None:
        with client.stream("POST", "/v1/chat/completions", json=slow) as r:
            result["status"] = r.status_code
            result["lines"] = [line for line in r.iter_lines() if line]

    t = threading.Thread(target=stream)
    t.start()
    statuses = []
    for raw in HOSTILE:
        r = client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        statuses.append(r.status_code)
        assert r.status_code < 500, (raw[:80], r.status_code, r.text[:300])
        if r.status_code != 200:  # a few are legal: max_tokens 1e30 under "truncate"...
            err = r.json()["error"]
            assert err["type"] and err["message"]
    for raw in HOSTILE[:20]:
        r = client.post("/v1/completions", content=raw)
        assert r.status_code < 500, (raw[:80], r.status_code, r.text[:300])
    t.join(timeout=60)
    assert result["status"] == 200
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["usage"]["completion_tokens"] == 300
    assert len(text.encode()) == 300  # one byte per token in the fake
    assert statuses.count(200) <= 5, statuses


def test_body_too_large(client):
    big = b'{"model": "fake-model", "messages": [{"role": "user", "content": "' + b"a" * 2_100_000
    r = client.post("/v1/chat/completions", content=big + b'"}]}')
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():
        yield big  # no Content-Length: the limit is enforced while reading

    r = client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413


def test_wrong_method_and_unknown_path(client):
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "NOT_FOUND"
