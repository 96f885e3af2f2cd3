"""Tool calls in a reply: parsing it (serving.tool_calls) and streaming it
(serving.tool_stream), which must agree for every split of the reply into deltas."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from serving.tool_calls import ToolCall, new_call_id, parse_reply, tool_format
from serving.tool_stream import ArgumentsDelta, ContentDelta, ToolCallStart, ToolCallStream

NAMES = ["get_weather", "now"]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NOW = '{"name": "now", "arguments": {}}'


def ids():
    """Deterministic call ids, so a parse and a stream of the same reply can be compared."""
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def call(i: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(f"call_{i:024x}", name, arguments)


# ---- parse_reply ----


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Just text.", "Just text.", []),
        (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [("get_weather", '{"city": "Paris"}')]),
        (
            f"Let me check.\n<tool_call>{WEATHER}</tool_call>\n"
            f"<tool_call>\n {NOW} \n</tool_call>\n",
            "Let me check.",
            [("get_weather", '{"city": "Paris"}'), ("now", "{}")],
        ),
        # The model stopped right after the JSON: the last block still counts.
        (f"<tool_call>\n{NOW}", None, [("now", "{}")]),
        # A block that isn't a valid call stays in the content as written ("*": the text).
        ('<tool_call>\n{"name": "now", "arguments": {}\n</tool_call>', "*", []),  # bad JSON
        ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "*", []),  # unknown name
        ('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>', "*", []),  # not an object
        ('<tool_call>{"name": "now"}</tool_call>', "*", []),  # no arguments
        ('<tool_call>{"name": "now", "arguments": {"x": NaN}}</tool_call>', "*", []),
        ("<tool_call>" + "[" * 100000 + "</tool_call>", "*", []),  # too deep for json
        (
            f'A <tool_call>{{"name": "now"}}</tool_call> B <tool_call>{NOW}</tool_call>',
            'A <tool_call>{"name": "now"}</tool_call> B',
            [("now", "{}")],
        ),
    ],
)
def test_hermes(text, content, calls):
    got_content, got_calls = parse_reply(text, "hermes", NAMES, ids())
    assert got_content == (text if content == "*" else content)
    assert got_calls == [call(i, *c) for i, c in enumerate(calls)]


def test_hermes_arguments_keep_unicode_and_ids_are_fresh():
    content, calls = parse_reply(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>',
        "hermes",
        NAMES,
    )
    assert content is None and calls[0].arguments == '{"city": "Zürich"}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert new_call_id() != new_call_id()


@pytest.mark.parametrize(
    "text, calls",
    [
        ('{"name": "now", "parameters": {}}', [("now", "{}")]),
        (
            ' <|python_tag|>{"name": "now", "parameters": {}}; '
            '{"name": "get_weather", "arguments": {"city": "Paris"}};\n',
            [("now", "{}"), ("get_weather", '{"city": "Paris"}')],
        ),
        ('{"name": "now", "parameters": {}} and more', []),
        ('{"name": "now", "parameters": {}}; {"name": "rm", "parameters": {}}', []),
        ('{"name": "now", "parameters": {', []),
        ("The answer is {1}", []),
        ('<|python_tag|>brave_search.call(query="x")', []),
    ],
)
def test_llama3_json(text, calls):
    content, got = parse_reply(text, "llama3_json", NAMES, ids())
    assert got == [call(i, *c) for i, c in enumerate(calls)]
    assert content == (None if calls else text.strip())


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (
            f"[TOOL_CALLS] [{WEATHER}, {NOW}]",
            None,
            [("get_weather", '{"city": "Paris"}'), ("now", "{}")],
        ),
        (
            'Sure. [TOOL_CALLS][{"name": "now", "arguments": {"s": "]}\\"["}}] Done.',
            "Sure.  Done.",
            [("now", '{"s": "]}\\"["}')],
        ),
        (f'[TOOL_CALLS] [{NOW}, {{"name": "rm", "arguments": {{}}}}]', "*", []),
        ("[TOOL_CALLS] []", "*", []),
        ("[TOOL_CALLS] hello", "*", []),
        (f"[TOOL_CALLS] [{NOW}", "*", []),
    ],
)
def test_mistral(text, content, calls):
    got_content, got = parse_reply(text, "mistral", NAMES, ids())
    assert got == [call(i, *c) for i, c in enumerate(calls)]
    assert got_content == (text if content == "*" else content)


def test_tool_format():
    assert tool_format(None) == "hermes"
    assert tool_format("{{ messages }}") == "hermes"
    assert tool_format("{%- if tools %}<tool_call>{{ tool | tojson }}</tool_call>") == "hermes"
    assert tool_format("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tool_format("{{- '<|python_tag|>' + tool_call.name }}") == "llama3_json"
    llama32 = """{{- "Environment: ipython\\n" }}{{- 'Respond in the format {"name": function
        name, "parameters": dictionary of argument name and its value}.' }}"""
    assert tool_format(llama32) == "llama3_json"


# ---- streaming ----

REPLIES = {
    "hermes": [
        "Just text, no < tool call.",
        f"  Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n",
        f"<tool_call>{NOW}</tool_call>\n\n<tool_call>\n{WEATHER}\n</tool_call>",
        f"a <tool_call>{{bad</tool_call> b <tool_call>{NOW}</tool_call> c ",
        f"x <tool_call>{NOW}",
        "x <tool_call>{bad",
        "ends with <tool_ca",
        "stray </tool_call> <<tool_call>",
    ],
    "llama3_json": [
        '{"name": "now", "parameters": {}}',
        ' <|python_tag|>{"name": "now", "parameters": {}}; {"name": "now", "arguments": {}}',
        '{"name": "now", "parameters": {}} extra',
        "  Plain {text} <|python_tag|>",
        "<|python_",
        " <b>",
    ],
    "mistral": [
        f"[TOOL_CALLS] [{WEATHER}, {NOW}]",
        'Sure. [TOOL_CALLS][{"name": "now", "arguments": {"s": "]}\\"["}}] Done. ',
        f"[TOOL_CALLS] [{NOW}, {{}}] [TOOL",
        "[TOOL_CALLS] hello [TOOL_CALLS]",
        "[TOOLS] [1]",
    ],
}


def stream(text: str, fmt: str, cuts: list[int]):
    """(content, calls) assembled from the events of `text` fed in pieces cut at `cuts`."""
    s = ToolCallStream(fmt, NAMES, ids())
    bounds = [0, *cuts, len(text)]
    events = [e for a, b in itertools.pairwise(bounds) for e in s.feed(text[a:b])]
    events += s.finish()
    content, starts, args = "", [], {}
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content += e.text
        elif isinstance(e, ToolCallStart):
            assert e.index == len(starts) and re.fullmatch(r"call_[0-9a-f]{24}", e.id)
            starts.append(e)
        else:
            assert isinstance(e, ArgumentsDelta) and e.index < len(starts)
            args[e.index] = args.get(e.index, "") + e.fragment
    return content, [ToolCall(e.id, e.name, args.get(e.index, "")) for e in starts]


def expected(text: str, fmt: str):
    content, calls = parse_reply(text, fmt, NAMES, ids())
    return content or "", calls


@pytest.mark.parametrize("fmt, text", [(f, t) for f, ts in REPLIES.items() for t in ts])
def test_stream_matches_parse_for_every_split(fmt, text):
    want = expected(text, fmt)
    n = len(text)
    for cuts in itertools.chain([[]], ([i] for i in range(n + 1))):
        assert stream(text, fmt, cuts) == want, cuts
    step = 1 if n <= 60 else 3  # all 2-cut splits of the short replies
    for i in range(0, n + 1, step):
        for j in range(i, n + 1, step):
            assert stream(text, fmt, [i, j]) == want, (i, j)


@pytest.mark.parametrize("fmt", list(REPLIES))
def test_stream_matches_parse_for_random_splits(fmt):
    rng = random.Random(0)
    for _ in range(200):
        parts = rng.choices(REPLIES[fmt], k=rng.randint(1, 4))
        text = "".join(parts)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(1, 12))))
        assert stream(text, fmt, cuts) == expected(text, fmt), (text, cuts)
        every = list(range(1, len(text)))  # one character at a time
        assert stream(text, fmt, every) == expected(text, fmt), text


def test_held_back_prefix_that_is_content_is_emitted():
    s = ToolCallStream("hermes", NAMES)
    assert s.feed("a <tool") == [ContentDelta("a")]  # " " and "<tool" held back
    assert s.feed("box> b") == [ContentDelta(" <toolbox> b")]
    assert s.feed("\n<") == []
    assert s.finish() == [ContentDelta("\n<")]

    s = ToolCallStream("mistral", NAMES)
    assert s.feed("[TOOL") == []
    assert s.feed("S]") == [ContentDelta("[TOOLS]")]

    s = ToolCallStream("llama3_json", NAMES)
    assert s.feed(" <|py") == []
    assert s.feed("thin") == [ContentDelta("<|pythin")]


def test_stream_emits_content_before_a_call_and_the_call_when_complete():
    s = ToolCallStream("hermes", NAMES, ids())
    assert s.feed("Checking.\n<tool_call>\n{") == [ContentDelta("Checking.")]
    assert s.feed('"name": "now", "arguments": {}}\n</tool_') == []
    assert s.feed("call> ") == [
        ToolCallStart(0, call(0, "now", "").id, "now"),
        ArgumentsDelta(0, "{}"),
    ]
    assert s.finish() == []

    s = ToolCallStream("llama3_json", NAMES, ids())
    assert s.feed('{"name": "now", "parameters": {}}') == []  # a second call may follow
    assert [type(e) for e in s.finish()] == [ToolCallStart, ArgumentsDelta]
