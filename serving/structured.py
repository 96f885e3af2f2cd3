"""`response_format` (docs/sampling.md 1.25) as an llguidance grammar.

`{"type": "text"}` is no grammar; `json_object` is any JSON object (or, as Fireworks allows,
the schema in its `schema` key); `json_schema` is its `json_schema.schema`; `grammar` is
llama.cpp GBNF. The shape of the field and the size of what it holds are checked here (a 400
naming response_format); what llguidance cannot compile (an unimplemented keyword, a dangling
$ref) is found when the engine validates the grammar against its tokenizer.

Fireworks' rule that an object schema with `properties` admits no other keys is applied here:
such a (sub)schema gets `additionalProperties: false` unless it says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import llguidance

from serving.errors import bad_request, show

PARAM = "response_format"
MAX_SCHEMA_BYTES = 256 * 1024  # serialized
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays
# llguidance converts GBNF in Python, in time that grows with rules x grammar size: these
# bound it to about half a second.
MAX_GRAMMAR_BYTES = 32 * 1024
MAX_GRAMMAR_RULES = 256
_CLOSE_FUEL = 100_000  # schema nodes visited + property names added while closing objects

# No free whitespace: a small model allowed a space or newline between tokens tends to repeat
# it until max_tokens. The separators are json.dumps' default ", " and ": ", the commonest
# spelling of JSON in training data, so the forced bytes are the ones the model expects.
# Overrides, so a schema's own "x-guidance" cannot turn free whitespace back on.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_FIELDS = {
    "text": {"type"},
    "json_object": {"type", "schema"},
    "json_schema": {"type", "json_schema", "schema"},
    "grammar": {"type", "grammar"},
}
_JSON_SCHEMA_FIELDS = {"name": str, "description": str, "strict": bool, "schema": object}

# Where a schema holds subschemas, by the shape of the value.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems")
_COMBINATORS = ("allOf", "anyOf", "oneOf")


def response_format_grammar(rf: Any) -> str | None:
    """The llguidance grammar for a request's `response_format`; None for no constraint."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad_request(f"response_format must be an object, got {show(rf)}", PARAM)
    kind = rf.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise bad_request(
            f"response_format type must be one of {', '.join(map(repr, _FIELDS))}, "
            f"got {show(kind)}",
            PARAM,
        )
    extra = sorted(set(rf) - _FIELDS[kind])
    if extra:
        raise bad_request(f"response_format {kind} does not take {show(extra)}", PARAM)
    if kind == "text":
        return None
    if kind == "grammar":
        return _gbnf_grammar(rf.get("grammar"))
    if kind == "json_object":
        schema = rf.get("schema")
        return _schema_grammar({"type": "object"} if schema is None else schema)
    return _schema_grammar(_json_schema_schema(rf))


def _json_schema_schema(rf: dict) -> Any:
    """The schema of a json_schema response_format: `json_schema.schema` as OpenAI sends it,
    or a bare `schema` as the Fireworks form does."""
    spec = rf.get("json_schema")
    if spec is None:
        spec = {"schema": rf.get("schema")}
    elif "schema" in rf:
        raise bad_request("response_format takes json_schema or schema, not both", PARAM)
    if not isinstance(spec, dict):
        raise bad_request(f"response_format json_schema must be an object, got {show(spec)}", PARAM)
    for key, value in spec.items():
        want = _JSON_SCHEMA_FIELDS.get(key)
        if want is None:
            raise bad_request(f"response_format json_schema does not take {key!r}", PARAM)
        if value is not None and not isinstance(value, want):
            raise bad_request(
                f"response_format json_schema.{key} must be a {want.__name__}, got {show(value)}",
                PARAM,
            )
    if spec.get("schema") is None:
        raise bad_request("response_format json_schema requires a schema", PARAM)
    return spec["schema"]


def _gbnf_grammar(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise bad_request("response_format grammar requires a grammar (GBNF text)", PARAM)
    if len(text.encode()) > MAX_GRAMMAR_BYTES or text.count("::=") > MAX_GRAMMAR_RULES:
        raise bad_request(
            f"response_format grammar is too large (over {MAX_GRAMMAR_BYTES} bytes or "
            f"{MAX_GRAMMAR_RULES} rules)",
            PARAM,
        )
    try:
        return llguidance.grammar_from("gbnf", text)
    except ValueError as e:  # the converter's own message says where the GBNF is wrong
        raise bad_request(f"response_format grammar: {e}", PARAM) from None


def _schema_grammar(schema: Any) -> str:
    if not isinstance(schema, dict | bool):
        raise bad_request(
            f"response_format schema must be a JSON object or boolean, got {show(schema)}", PARAM
        )
    _check_depth(schema)
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except ValueError as e:  # NaN or Infinity, when called on a body not from serving.body
        raise bad_request(f"response_format schema is not valid JSON: {e}", PARAM) from None
    if size > MAX_SCHEMA_BYTES:
        raise bad_request(
            f"response_format schema is too large (over {MAX_SCHEMA_BYTES} bytes)", PARAM
        )
    if isinstance(schema, bool):  # llguidance applies options only to an object schema
        schema = {"anyOf": [schema]}
    closed = _Closer(schema).closed()
    return llguidance.LLMatcher.grammar_from_json_schema(closed, overrides=JSON_OPTIONS)


def _check_depth(value: Any) -> None:
    """Iterative, so a hostile depth never reaches Python's recursion limit."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise bad_request(
                    f"response_format schema is nested too deeply (over {MAX_SCHEMA_DEPTH} "
                    "levels of objects and arrays)",
                    PARAM,
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _map_subschemas(node: dict, ptr: str, fn: Callable[[Any, str], Any]) -> dict:
    """A shallow copy of `node` with fn(subschema, its JSON pointer) for each subschema."""
    out = dict(node)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {k: fn(v, f"{ptr}/{key}/{_escape(k)}") for k, v in node[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [fn(v, f"{ptr}/{key}/{i}") for i, v in enumerate(node[key])]
    for key in _SCHEMA_VALUES:
        if isinstance(node.get(key), dict):
            out[key] = fn(node[key], f"{ptr}/{key}")
    return out


def _shares(node: dict) -> bool:
    """Whether a schema's members describe the same object as its own properties do."""
    return "properties" in node or "allOf" in node


def _members(ptr: str, node: dict) -> list[str]:
    """Pointers of the schemas combined with `node`: its allOf / anyOf / oneOf members and
    its local $ref's target."""
    out = [
        f"{ptr}/{key}/{i}"
        for key in _COMBINATORS
        if isinstance(node.get(key), list)
        for i in range(len(node[key]))
    ]
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out.append(unquote(ref[1:]))
    return out


class _Closer:
    """Fireworks' closed objects, correct under combinators.

    Injecting `additionalProperties: false` into each allOf member would make each forbid
    the other members' keys. So a schema whose members combine with its own properties (it
    has properties or allOf) is closed once, over the union of its own and its members'
    property names (added to its `properties` as `{}`), and those members - transitively,
    through local $refs too - are left open. That is more permissive than Fireworks in two
    places, never unsatisfiable: a shared member is open wherever else it is used too, and
    an anyOf / oneOf branch of such a schema admits the other branches' keys. The branches
    of a schema without properties of its own (the usual union) are closed each on its own.
    """

    def __init__(self, schema: dict):
        self.schema = schema
        self.fuel = _CLOSE_FUEL
        self.index: dict[str, dict] = {}
        self._record(schema, "")
        self.open = self._open_members()

    def closed(self) -> dict:
        return self._close(self.schema, "")

    def _record(self, node: Any, ptr: str) -> Any:
        if isinstance(node, dict):
            self.index[ptr] = node
            _map_subschemas(node, ptr, self._record)
        return node

    def _open_members(self) -> set[str]:
        stack = [
            m for ptr, node in self.index.items() if _shares(node) for m in _members(ptr, node)
        ]
        opened: set[str] = set()
        while stack:
            ptr = stack.pop()
            if ptr in self.index and ptr not in opened:
                opened.add(ptr)
                stack.extend(_members(ptr, self.index[ptr]))
        return opened

    def _spend(self, n: int) -> None:
        self.fuel -= n
        if self.fuel < 0:
            raise bad_request("response_format schema is too complex to close its objects", PARAM)

    def _close(self, node: Any, ptr: str) -> Any:
        if not isinstance(node, dict):
            return node
        out = _map_subschemas(node, ptr, self._close)
        props = node.get("properties", {})
        if (
            ptr in self.open
            or not _shares(node)
            or "additionalProperties" in node
            or "unevaluatedProperties" in node
            or not isinstance(props, dict)
        ):
            return out
        names = self._names(ptr)
        if names is None or not (names or "properties" in node):
            return out
        self._spend(len(names))
        out["properties"] = {**{n: {} for n in names}, **out.get("properties", {})}
        out["additionalProperties"] = False
        return out

    def _names(self, ptr: str) -> list[str] | None:
        """Property names of the schema at `ptr` and of its open members, own first; None
        when a member says itself what other keys it admits."""
        names: dict[str, None] = {}
        seen: set[str] = set()
        stack = [ptr]
        while stack:
            p = stack.pop()
            if p in seen or p not in self.index:
                continue
            seen.add(p)
            node = self.index[p]
            if p != ptr and ("additionalProperties" in node or "unevaluatedProperties" in node):
                return None
            props = node.get("properties")
            if isinstance(props, dict):
                names.update(dict.fromkeys(props))
            self._spend(1)
            stack.extend(reversed(_members(p, node)))
        return list(names)
