"""The request's tools (serving.tool_prompt): validation, the default prompt, and the
tool_choice grammars, run by llguidance on the default model's tokenizer."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from checkpoints.registry import DEFAULT_MODEL, resolve
from engine.tokenizer import Tokenizer
from serving.tool_calls import parse_reply
from serving.tool_prompt import check_tools, tool_choice_grammar, tools_system_prompt
from tests.test_serving_tool_calls import NAMES, call, ids

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"$ref": "#/$defs/city"}, "days": {"type": "integer"}},
                "required": ["city"],
                "additionalProperties": False,
                "$defs": {"city": {"type": "string", "enum": ["Paris", "Zürich"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_check_tools_accepts_openai_tools():
    assert check_tools(TOOLS) == TOOLS
    extra = {"type": "function", "function": {"name": "a-b_1", "description": "", "strict": True}}
    assert check_tools([extra]) == [extra]


@pytest.mark.parametrize(
    "tools, problem",
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        (["f"], r"tools\[0\] must be an object"),
        ([{"type": "code_interpreter"}], r"tools\[0\].type must be 'function'"),
        ([{"type": "function"}], r"tools\[0\].function must be an object"),
        ([{"type": "function", "function": {"name": "a b"}}], "name must be 1 to 64"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "name must be 1 to 64"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, r"tools\[1\].*'f' is not unique"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters must"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "type 'object'",
        ),
        ([{"type": "function", "function": {"name": "f", "description": 1}}], "description"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "strict"),
        ([{"type": "function", "function": {"name": "f", "args": {}}}], "unknown field.*'args'"),
    ],
)
def test_check_tools_names_the_problem(tools, problem):
    with pytest.raises(ValueError, match=problem):
        check_tools(tools)


def test_system_prompt_lists_the_functions_and_the_call_format():
    prompt = tools_system_prompt(TOOLS)
    assert json.dumps(TOOLS[0]["function"]["parameters"], ensure_ascii=False) in prompt
    assert '"name": "now"' in prompt and "The weather in a city" in prompt
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        in prompt
    )


def test_tool_choice_without_a_forced_call_or_unknown():
    assert tool_choice_grammar(TOOLS, "auto", True, "hermes") is None
    assert tool_choice_grammar(TOOLS, "none", True, "hermes") is None
    with pytest.raises(ValueError, match="'nope', which is not in tools"):
        tool_choice_grammar(
            TOOLS, {"type": "function", "function": {"name": "nope"}}, True, "hermes"
        )
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_choice_grammar(TOOLS, "sometimes", True, "hermes")
    bad = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
            },
        }
    ]
    with pytest.raises(ValueError, match="can't constrain"):
        tool_choice_grammar(bad, "required", False, "hermes")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The default model's HF tokenizer (the one checkpoints/ writes), and llguidance's."""
    folder = tmp_path_factory.mktemp("tok")
    resolve(DEFAULT_MODEL).open().save_tokenizer(folder)
    hf = Tokenizer.from_dir(folder).hf
    return hf, llguidance.hf.from_tokenizer(hf)


def matcher(tok, grammar: str) -> llguidance.LLMatcher:
    hf, ll = tok
    m = llguidance.LLMatcher(ll, grammar)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tok, grammar: str, text: str) -> bool:
    """Whether the grammar takes `text` as a whole reply (then only EOS may follow)."""
    hf, _ = tok
    m = matcher(tok, grammar)
    if not m.consume_tokens(hf.encode(text, add_special_tokens=False)) or not m.is_accepting():
        return False
    return m.consume_token(hf.eos_token_id) and m.is_stopped()


CALLS = {
    "hermes": lambda c: f"<tool_call>\n{json.dumps(c)}\n</tool_call>",
    "llama3_json": lambda c: json.dumps({"name": c["name"], "parameters": c["arguments"]}),
    "mistral": lambda c: f"[TOOL_CALLS]{json.dumps([c])}",
}
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}


@pytest.mark.parametrize("fmt", list(CALLS))
def test_required_grammar_accepts_a_call_and_parse_reads_it(tok, fmt):
    grammar = tool_choice_grammar(TOOLS, "required", False, fmt)
    for c in [PARIS, {"name": "now", "arguments": {}}]:
        text = CALLS[fmt](c)
        assert accepts(tok, grammar, text), text
        content, calls = parse_reply(text, fmt, NAMES, ids())
        assert content is None
        assert calls == [call(0, c["name"], json.dumps(c["arguments"]))]


@pytest.mark.parametrize("fmt", list(CALLS))
def test_grammar_rejects_wrong_names_and_arguments(tok, fmt):
    grammar = tool_choice_grammar(TOOLS, "any", False, fmt)
    wrong = [
        {"name": "rm", "arguments": {}},
        {"name": "get_weather", "arguments": {"city": "Lyon"}},  # not in the enum ($ref)
        {"name": "get_weather", "arguments": {"city": 3}},
        {"name": "get_weather", "arguments": {}},  # required city missing
        {"name": "get_weather", "arguments": {"city": "Paris", "when": "now"}},
        {"name": "now", "arguments": {"x": 1}},  # takes no parameters
    ]
    for c in wrong:
        assert not accepts(tok, grammar, CALLS[fmt](c)), c
    assert not accepts(tok, grammar, "Sure! " + CALLS[fmt](PARIS))
    # One spelling of the JSON: json.dumps' separators, no free whitespace.
    assert not accepts(tok, grammar, CALLS[fmt](PARIS).replace(", ", ","))
    assert not accepts(tok, grammar, CALLS[fmt](PARIS).replace(", ", ",\n  "))


def test_named_function_grammar_allows_only_it(tok):
    named = {"type": "function", "function": {"name": "now"}}
    grammar = tool_choice_grammar(TOOLS, named, True, "hermes")
    assert accepts(tok, grammar, CALLS["hermes"]({"name": "now", "arguments": {}}))
    assert not accepts(tok, grammar, CALLS["hermes"](PARIS))


@pytest.mark.parametrize("fmt, joiner", [("hermes", "\n"), ("llama3_json", "; ")])
def test_parallel_calls(tok, fmt, joiner):
    two = CALLS[fmt](PARIS) + joiner + CALLS[fmt]({"name": "now", "arguments": {}})
    assert not accepts(tok, tool_choice_grammar(TOOLS, "required", False, fmt), two)
    assert accepts(tok, tool_choice_grammar(TOOLS, "required", True, fmt), two)
    _, calls = parse_reply(two, fmt, NAMES, ids())
    assert [c.name for c in calls] == ["get_weather", "now"]


def test_parallel_calls_mistral(tok):
    two = "[TOOL_CALLS]" + json.dumps([PARIS, {"name": "now", "arguments": {}}])
    assert not accepts(tok, tool_choice_grammar(TOOLS, "required", False, "mistral"), two)
    assert accepts(tok, tool_choice_grammar(TOOLS, "required", True, "mistral"), two)
    assert [c.name for c in parse_reply(two, "mistral", NAMES)[1]] == ["get_weather", "now"]
