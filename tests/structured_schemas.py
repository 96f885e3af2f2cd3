"""JSON schemas for response_format tests, small enough for a 135M model at max_tokens ~200.

SCHEMAS: (name, schema, a valid instance, keys in `properties` order as llguidance writes
them). Strings are bounded by maxLength (or enum, const, pattern, format), arrays by maxItems,
numbers by a range (and multipleOf, which bounds their decimals): any reply the grammar admits
is short even from an unhelpful model, but for the depth of `recursive_tree` and the extra
key's name in `additional_schema`, which no schema can bound. REJECTED: (schema name, an
instance its grammar rejects); "Fireworks" marks valid JSON Schema with a key that Fireworks'
rule (an object with `properties` admits no other keys) forbids. HOSTILE: (name,
response_format, part of the error): a 400, or llguidance's error naming the keyword.
"""

from __future__ import annotations

from typing import Any


def obj(required: list[str] | None = None, **props: Any) -> dict:
    """An object schema: every property required unless `required` names them."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }


def integer(lo: int, hi: int, **kw: Any) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi, **kw}


def string(max_length: int, **kw: Any) -> dict:
    return {"type": "string", "maxLength": max_length, **kw}


def array(items: Any, max_items: int, **kw: Any) -> dict:
    return {"type": "array", "items": items, "maxItems": max_items, **kw}


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


BOOL = {"type": "boolean"}
DIGIT = integer(0, 9)
SMALL = integer(-100, 100)
NODE = obj(["v"], v=DIGIT, kids=array(ref("node"), 2))
# As pydantic writes `class Pet: name: str` and `class Household: owner: str; pet: Pet | None`
PET = {**obj(name={"maxLength": 10, "title": "Name", "type": "string"}), "title": "Pet"}
PET_OR_NONE = {"anyOf": [ref("Pet"), {"type": "null"}], "default": None}
ANNOTATIONS = {"title": "T", "description": "ignored", "$comment": "x", "examples": ["low"]}

SCHEMAS: list[tuple[str, Any, Any]] = [
    ("flat_person", obj(name=string(12), age=integer(0, 120)), {"name": "Ada", "age": 36}),
    (
        "optional_keys",
        obj(["title"], title=string(20), subtitle=string(12), pages=DIGIT),
        {"title": "Dune", "pages": 4},
    ),
    ("all_optional", obj([], done=BOOL, note=string(8)), {"note": "hi"}),
    ("empty_properties", {"type": "object", "properties": {}}, {}),
    (
        "nested_address",
        obj(
            name=string(12),
            address=obj(city=string(12), zip={"type": "string", "pattern": "^[0-9]{5}$"}),
        ),
        {"name": "Bo", "address": {"city": "Paris", "zip": "75001"}},
    ),
    ("deep_nesting", obj(a=obj(b=obj(c=obj(d=DIGIT)))), {"a": {"b": {"c": {"d": 7}}}}),
    ("string_enum", obj(color={"enum": ["red", "green", "blue"]}), {"color": "green"}),
    ("integer_enum", obj(level={"type": "integer", "enum": [1, 2, 3]}), {"level": 2}),
    ("mixed_enum", obj(v={"enum": ["a", 1, True, None]}), {"v": None}),
    ("unicode_enum", obj(city={"enum": ["Zürich", "São Paulo", "東京"]}), {"city": "東京"}),
    ("top_level_enum", {"enum": ["yes", "no", "maybe"]}, "maybe"),
    (
        "const_fields",
        obj(version={"const": 2}, kind={"const": "point"}, x=SMALL),
        {"version": 2, "kind": "point", "x": -3},
    ),
    ("booleans", obj(done=BOOL, urgent=BOOL), {"done": False, "urgent": True}),
    ("nullable", obj(note={"type": ["string", "null"], "maxLength": 10}), {"note": None}),
    ("null_only", obj(nothing={"type": "null"}), {"nothing": None}),
    (
        "integer_ranges",
        obj(
            temp=integer(-40, 50),
            pct={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        ),
        {"temp": -12, "pct": 99},
    ),
    (
        "number_ranges",  # multipleOf a power of two: exact in binary, so jsonschema agrees
        obj(
            price={"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25},
            ratio={"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
        ),
        {"price": 12.75, "ratio": 0.375},
    ),
    ("top_level_integer", integer(1, 10), 7),
    ("string_array", obj(tags=array(string(8), 3, minItems=1)), {"tags": ["a", "b"]}),
    ("integer_array", obj(scores=array(DIGIT, 3)), {"scores": []}),
    ("top_level_array", array(string(8), 3, minItems=1), ["x"]),
    (
        "array_of_objects",
        obj(lines=array(obj(sku=string(8), qty=DIGIT), 2)),
        {"lines": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}]},
    ),
    ("nested_arrays", obj(m=array(array(DIGIT, 2), 2)), {"m": [[1, 2], [3]]}),
    (
        "tuple_prefix_items",
        obj(point={"type": "array", "prefixItems": [SMALL, SMALL], "items": False, "minItems": 2}),
        {"point": [3, -4]},
    ),
    (
        "min_items",
        obj(picks=array({"enum": ["x", "y", "z"]}, 3, minItems=2)),
        {"picks": ["x", "z"]},
    ),
    (
        "string_pattern",
        obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}),
        {"code": "ABC-12"},
    ),
    ("string_format_date", obj(day={"type": "string", "format": "date"}), {"day": "2024-02-29"}),
    ("string_lengths", obj(word=string(6, minLength=2)), {"word": "hello"}),
    ("anyof_scalar", obj(value={"anyOf": [DIGIT, string(8)]}), {"value": "five"}),
    (
        "anyof_objects",
        obj(
            shape={
                "anyOf": [
                    obj(kind={"const": "circle"}, r=DIGIT),
                    obj(kind={"const": "square"}, side=DIGIT),
                ]
            }
        ),
        {"shape": {"kind": "square", "side": 3}},
    ),
    (
        "oneof_objects",
        {"oneOf": [obj(pet={"const": "cat"}, lives=DIGIT), obj(pet={"const": "dog"}, good=BOOL)]},
        {"pet": "dog", "good": True},
    ),
    (
        "allof_merge",
        {"type": "object", "allOf": [obj(id=DIGIT), obj(label=string(12))]},
        {"id": 4, "label": "four"},
    ),
    (
        "allof_with_ref",
        {"$defs": {"base": obj(id=DIGIT)}, "allOf": [ref("base"), obj(extra=BOOL)]},
        {"id": 1, "extra": False},
    ),
    (
        "properties_with_anyof",
        {**obj(kind={"enum": ["a", "b"]}), "anyOf": [obj(a=DIGIT), obj(b=string(8))]},
        {"kind": "a", "a": 5},
    ),
    (
        "defs_ref",
        {"$defs": {"point": obj(x=SMALL, y=SMALL)}, **obj(start=ref("point"), end=ref("point"))},
        {"start": {"x": 0, "y": 0}, "end": {"x": 3, "y": 4}},
    ),
    (
        "definitions_ref",
        {
            "definitions": {"color": {"enum": ["red", "blue"]}},
            **obj(fg={"$ref": "#/definitions/color"}, bg={"$ref": "#/definitions/color"}),
        },
        {"fg": "red", "bg": "blue"},
    ),
    (
        "recursive_tree",
        {"$defs": {"node": NODE}, **ref("node")},
        {"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]},
    ),
    (
        "bounded_tree",
        {
            "$defs": {"leaf": obj(v=DIGIT), "mid": obj(v=DIGIT, kids=array(ref("leaf"), 2))},
            **obj(v=DIGIT, kids=array(ref("mid"), 2)),
        },
        {"v": 0, "kids": [{"v": 1, "kids": [{"v": 2}]}]},
    ),
    ("additional_false", {**obj(id=DIGIT), "additionalProperties": False}, {"id": 3}),
    (
        "additional_true",  # kept open; maxProperties leaves no room for an extra key
        {**obj(id=DIGIT), "additionalProperties": True, "maxProperties": 1},
        {"id": 3},
    ),
    (
        "additional_schema",
        {**obj(id=DIGIT), "additionalProperties": DIGIT, "maxProperties": 2},
        {"id": 3, "k": 4},
    ),
    (
        "pattern_properties",
        {
            "type": "object",
            "patternProperties": {"^[a-z]{1,6}$": DIGIT},
            "additionalProperties": False,
            "maxProperties": 2,
        },
        {"ab": 1},
    ),
    (
        "pydantic_style",
        {"$defs": {"Pet": PET}, **obj(["owner"], owner=string(12), pet=PET_OR_NONE)},
        {"owner": "Kim", "pet": {"name": "Rex"}},
    ),
    (
        "annotations",
        {**ANNOTATIONS, **obj(severity={**ANNOTATIONS, "enum": ["low", "high"]})},
        {"severity": "high"},
    ),
]

REJECTED: list[tuple[str, Any]] = [
    ("flat_person", {"name": "Ada", "age": 36, "email": "a@b"}),  # Fireworks
    ("flat_person", {"name": "Ada"}),  # age is required
    ("nested_address", {"name": "Bo", "address": {"city": "X", "zip": "75001", "n": 1}}),  # F.
    ("deep_nesting", {"a": {"b": {"c": {"d": 7, "e": 8}}}}),  # Fireworks
    ("string_enum", {"color": "pink"}),
    ("const_fields", {"version": 3, "kind": "point", "x": 0}),
    ("integer_ranges", {"temp": 51, "pct": 50}),
    ("integer_ranges", {"temp": 0, "pct": 100}),  # exclusiveMaximum
    ("number_ranges", {"price": 1.3, "ratio": 0.5}),  # multipleOf
    ("string_array", {"tags": ["a", "b", "c", "d"]}),
    ("string_array", {"tags": []}),
    ("string_lengths", {"word": "toolong"}),
    ("string_pattern", {"code": "AB-12"}),
    ("oneof_objects", {"pet": "cat", "lives": 9, "good": True}),  # Fireworks, in a branch
    ("allof_merge", {"id": 4, "label": "four", "x": 1}),  # Fireworks, at the allOf holder
    ("allof_with_ref", {"id": 1, "extra": False, "x": 1}),  # Fireworks
    ("properties_with_anyof", {"kind": "a", "a": 5, "z": 1}),  # Fireworks
    ("defs_ref", {"start": {"x": 0, "y": 0, "z": 0}, "end": {"x": 1, "y": 1}}),  # F., in $defs
    ("recursive_tree", {"v": 1, "kids": [{"v": 2, "w": 0}]}),  # Fireworks, one level down
    ("additional_true", {"id": 3, "k": 4}),  # maxProperties
    ("additional_schema", {"id": 3, "k": "x"}),
    ("pattern_properties", {"ABC": 1}),
    ("pydantic_style", {"owner": "Kim", "pet": {"name": "Rex", "age": 3}}),  # Fireworks
    ("empty_properties", {"a": 1}),  # Fireworks
]


def _spec(**spec: Any) -> dict:
    return {"type": "json_schema", "json_schema": spec}


def _json_schema(schema: Any) -> dict:
    return _spec(name="t", schema=schema)


def _gbnf(text: Any) -> dict:
    return {"type": "grammar", "grammar": text}


def _nested_arrays(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


HUGE = {"type": "object", "properties": {f"k{i}": string(20) for i in range(12_000)}}

HOSTILE: list[tuple[str, Any, str]] = [
    ("not_an_object", "json", "must be an object"),
    ("unknown_type", {"type": "xml"}, "type must be one of"),
    ("type_not_a_string", {"type": 5}, "type must be one of"),
    ("text_with_extra_field", {"type": "text", "schema": {}}, "does not take"),
    ("json_schema_missing", {"type": "json_schema"}, "requires a schema"),
    ("json_schema_without_schema", _spec(name="t"), "requires a schema"),
    ("json_schema_not_an_object", {"type": "json_schema", "json_schema": "t"}, "must be an object"),
    ("json_schema_unknown_field", _spec(schema={}, x=1), "does not take 'x'"),
    ("json_schema_bad_name", _spec(name=5, schema={}), "name must be a str"),
    ("json_schema_bad_strict", _spec(strict="y", schema={}), "strict must be a bool"),
    ("both_schema_forms", {**_spec(schema={}), "schema": {}}, "not both"),
    ("schema_a_list", _json_schema([{"type": "object"}]), "JSON object or boolean"),
    ("schema_a_string", {"type": "json_object", "schema": "object"}, "JSON object or boolean"),
    ("schema_false", _json_schema(False), "schema is false"),
    ("unique_items", _json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ("not", _json_schema({"not": {"type": "string"}}), '"not"'),
    ("if_then", _json_schema({"if": {"type": "string"}, "then": {"maxLength": 3}}), '"if"'),
    ("contains", _json_schema({"type": "array", "contains": {"type": "integer"}}), "contains"),
    ("property_names", _json_schema({"propertyNames": {"maxLength": 3}}), "propertyNames"),
    ("unevaluated", _json_schema({"unevaluatedProperties": False}), "unevaluatedProperties"),
    ("dangling_ref", _json_schema({"$ref": "#/$defs/missing"}), "does not exist"),
    ("remote_ref", _json_schema({"$ref": "https://example.com/s.json"}), "example.com"),
    ("huge_schema", _json_schema(HUGE), "too large"),
    ("deep_schema", _json_schema(_nested_arrays(100)), "nested too deeply"),
    ("grammar_missing", {"type": "grammar"}, "requires a grammar"),
    ("grammar_not_text", _gbnf(['root ::= "a"']), "requires a grammar"),
    ("gbnf_unclosed_group", _gbnf('root ::= ("a"'), "Expected ')'"),
    ("gbnf_no_root", _gbnf('answer ::= "a"'), "No 'root' rule"),
    ("gbnf_undefined_rule", _gbnf("root ::= item"), "Rule 'item' not found"),
    ("gbnf_huge", _gbnf('root ::= "a"\n' + "# padding\n" * 8_000), "too large"),
    ("gbnf_many_rules", _gbnf("\n".join(f'r{i} ::= "a"' for i in range(300))), "too large"),
]
