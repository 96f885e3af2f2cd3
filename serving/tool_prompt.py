"""The request's tools: validating them, a default prompt for chat templates that don't render
tools, and the llguidance grammar that tool_choice "required" or a named function imposes."""

from __future__ import annotations

import json
import re
from typing import Any

from llguidance import LLMatcher

from serving.errors import show
from serving.structured import JSON_OPTIONS
from serving.tool_calls import HERMES, HERMES_END, LLAMA3_JSON, MISTRAL, START

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
# Keywords whose values are data, not schemas: a "$ref" inside one is not a reference.
_DATA_KEYWORDS = {"const", "enum", "default", "examples"}
# Keywords whose values map names to schemas.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# What a function without "parameters" takes: nothing.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_GRAMMAR_POSITION = re.compile(r"^at \d+\(\d+\): ")

# The default prompt: Hermes' tool prompt, which serving.tool_calls parses as "hermes".
_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions, as JSON \
signatures, are:
<tools>
{signatures}
</tools>

To call a function, reply with a JSON object naming it and giving its arguments, within \
<tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
For several calls, write one such block per call. Each function's result comes back to you \
in a message with the role "tool"."""


def check_tools(tools: Any) -> list[dict]:
    """The OpenAI `tools` list, validated: each `{"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}`, names unique. Raises ValueError naming the
    problem (a 400 on field "tools")."""
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"tools must be a non-empty list of functions, got {show(tools)}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _check_object(tool, where, _TOOL_KEYS)
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type must be 'function', got {show(tool.get('type'))}")
        function = tool.get("function")
        _check_object(function, f"{where}.function", _FUNCTION_KEYS)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', "
                f"got {show(name)}"
            )
        if name in names:
            raise ValueError(f"{where}.function.name {name!r} is not unique among the tools")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise ValueError(f"{where}.function.description must be a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(
                f"{where}.function.parameters must be a JSON schema of type 'object', "
                f"got {show(parameters)}"
            )
        if not isinstance(function.get("strict", False), bool):
            raise ValueError(f"{where}.function.strict must be a boolean")
    return list(tools)


def _check_object(value: Any, where: str, keys: set[str]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {show(value)}")
    extra = sorted(set(value) - keys)
    if extra:
        raise ValueError(f"{where} has unknown field(s) {', '.join(map(repr, extra))}")


def tools_system_prompt(tools: list[dict]) -> str:
    """A system prompt describing `tools` (validated by check_tools) and the hermes call
    format, for a chat template that doesn't render tools itself."""
    signatures = "\n".join(
        json.dumps(
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description", ""),
                "parameters": t["function"].get("parameters", _NO_PARAMETERS),
            },
            ensure_ascii=False,
        )
        for t in tools
    )
    return _PROMPT.format(signatures=signatures)


def tool_choice_grammar(
    tools: list[dict], choice: str | dict, parallel: bool, fmt: str
) -> str | None:
    """The llguidance grammar (for LLMatcher) that forces a reply of tool calls in format
    `fmt`: one call, or one or more if `parallel`, each to one of the allowed functions with
    arguments matching its parameters schema. None for tool_choice "auto" / "none". Raises
    ValueError (a 400 on field "tool_choice") for an unknown choice or function, or a
    parameters schema llguidance can't compile."""
    functions = _chosen(tools, choice)
    if functions is None:
        return None
    key = "parameters" if fmt == LLAMA3_JSON else "arguments"
    where = "#/items/anyOf" if fmt == MISTRAL else "#/anyOf"
    try:
        calls = [
            _call_schema(f, key, f"{where}/{i}/properties/{key}") for i, f in enumerate(functions)
        ]
    except RecursionError:  # a client's schema must not make a 500
        raise ValueError("tool_choice: a tool's parameters schema is nested too deeply") from None
    schema: dict[str, Any] = {"anyOf": calls}
    if fmt == MISTRAL:
        schema = {"type": "array", "items": schema, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
    body = "body: %json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
    if fmt == HERMES:
        tagged = _lark_string(START[HERMES] + "\n") + " body " + _lark_string("\n" + HERMES_END)
        rules = ["start: call" + (' ("\\n" call)*' if parallel else ""), "call: " + tagged]
    elif fmt == LLAMA3_JSON:
        rules = ["start: body" + (' ("; " body)*' if parallel else "")]
    else:
        rules = ["start: " + _lark_string(START[MISTRAL]) + " body"]
    grammar = LLMatcher.grammar_from_lark("\n".join([*rules, body]) + "\n")
    error = LLMatcher.validate_grammar(grammar)
    if error:
        reason = _GRAMMAR_POSITION.sub("", error.splitlines()[0])
        raise ValueError(f"tool_choice: the tools' parameters can't constrain the reply: {reason}")
    return grammar


def _chosen(tools: list[dict], choice: str | dict) -> list[dict] | None:
    """The functions tool_choice allows a forced call to, None when no call is forced."""
    if choice in ("auto", "none"):
        return None
    if choice in ("required", "any"):  # "any": Fireworks' name for "required"
        if not tools:
            raise ValueError(f"tool_choice {choice!r} needs at least one tool in tools")
        return [t["function"] for t in tools]
    if isinstance(choice, dict) and choice.get("type") == "function":
        named = choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        for tool in tools:
            if tool["function"]["name"] == name:
                return [tool["function"]]
        raise ValueError(f"tool_choice names the function {show(name)}, which is not in tools")
    raise ValueError(
        "tool_choice must be 'auto', 'none', 'required' or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {show(choice)}'
    )


def _call_schema(function: dict, key: str, pointer: str) -> dict:
    """The schema of one call's JSON: the function's name, then arguments matching its
    parameters (placed at `pointer` in the whole schema, where its own "#..." refs now point)."""
    parameters = function.get("parameters", _NO_PARAMETERS)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, key: _rebase(parameters, pointer)},
        "required": ["name", key],
        "additionalProperties": False,
    }


def _rebase(schema: Any, pointer: str) -> Any:
    """`schema` with its local refs ("#", "#/$defs/x") made relative to `pointer`."""
    if isinstance(schema, list):
        return [_rebase(s, pointer) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = pointer + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            # Property names are not keywords: a property named "enum" is still a schema.
            out[key] = {name: _rebase(s, pointer) for name, s in value.items()}
        else:
            out[key] = _rebase(value, pointer)
    return out


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark one
