"""A chat request's tools: how they reach the prompt, which grammar forces a call, how the
reply is read back.

A template that renders tools itself (it names `tools`, as Qwen2.5's, Llama 3.1's, Hermes'
do) gets them through transformers' `apply_chat_template(tools=...)`, assistant tool calls as
`tool_calls` and results as `tool` messages. Any other template gets serving.tool_prompt's
default system prompt (the functions and the Hermes `<tool_call>` format), earlier calls as
that text and results as user turns wrapped in `<tool_response>` tags, Hermes' convention.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from serving.errors import bad_request
from serving.tool_calls import HERMES, HERMES_END, START, tool_format
from serving.tool_prompt import check_tools, tool_choice_grammar, tools_system_prompt


@dataclasses.dataclass(frozen=True)
class ToolSetup:
    """What the reply of a request with tools is parsed for."""

    fmt: str  # serving.tool_calls format
    names: frozenset[str]


def native_tools(chat_template: str | None) -> bool:
    """The template renders a `tools` list itself."""
    return "tools" in (chat_template or "")


def prepare_tools(
    tools: Any, tool_choice: Any, parallel: bool | None, chat_template: str | None
) -> tuple[list[dict] | None, ToolSetup | None, str | None]:
    """(the tools the prompt shows, what the reply is parsed for, the grammar forcing a
    call): all None when there are no tools or tool_choice is "none"."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice requires tools", "tool_choice")
        return None, None, None
    try:
        checked = check_tools(tools)
    except ValueError as e:
        raise bad_request(str(e), "tools") from None
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None, None, None
    fmt = tool_format(chat_template) if native_tools(chat_template) else HERMES
    try:
        grammar = tool_choice_grammar(checked, choice, parallel is not False, fmt)
    except ValueError as e:
        raise bad_request(str(e), "tool_choice") from None
    names = frozenset(t["function"]["name"] for t in checked)
    return checked, ToolSetup(fmt, names), grammar


def template_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> list[dict]:
    """OpenAI messages (ChatMessage.template_dict) as the template takes them: tool calls
    with their arguments as objects for a native template, else as Hermes text."""
    out = []
    for m in messages:
        calls = m.pop("tool_calls", None)
        if native:
            if calls:
                m["tool_calls"] = [_template_call(c) for c in calls]
            out.append(m)
            continue
        if calls:
            blocks = [
                f"{START[HERMES]}\n{_call_json(c)}\n{HERMES_END}"
                for c in map(_template_call, calls)
            ]
            m["content"] = "\n".join(filter(None, [m["content"], *blocks]))
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not native:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _template_call(call: dict) -> dict:
    """An assistant message's tool call (checked by protocol.ChatMessage) with its
    arguments parsed: templates write them with tojson."""
    f = call["function"]
    try:
        arguments = json.loads(f["arguments"])
    except json.JSONDecodeError:
        raise bad_request(
            f"tool call {f['name']!r}: arguments must be a JSON object string", "messages"
        ) from None
    if not isinstance(arguments, dict):
        raise bad_request(f"tool call {f['name']!r}: arguments must be a JSON object", "messages")
    return {"id": call["id"], "type": "function", "function": {**f, "arguments": arguments}}


def _call_json(call: dict) -> str:
    f = call["function"]
    return json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False)
