"""response_format as an llguidance grammar (serving.structured), checked with the default
model's tokenizer: every corpus schema compiles, admits its instance spelled as json.dumps
spells it and rejects the REJECTED ones; Fireworks' closed objects, allOf, GBNF, and every
HOSTILE response_format fails with a message naming what is wrong."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import pytest

from checkpoints.registry import resolve
from engine.tokenizer import Tokenizer
from serving.errors import APIError
from serving.structured import response_format_grammar
from tests.structured_schemas import HOSTILE, REJECTED, SCHEMAS

BY_NAME = {name: schema for name, schema, _ in SCHEMAS}


@pytest.fixture(scope="module")
def lltok(tmp_path_factory) -> llguidance.LLTokenizer:
    folder = tmp_path_factory.mktemp("tok")
    resolve("smollm2-135m-instruct").open().save_tokenizer(folder)
    return llguidance.hf.from_tokenizer(Tokenizer.from_dir(folder, {"eos_token_id": 2}).hf)


def _json_schema(schema: Any) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def _carried(grammar: str) -> Any:
    """The JSON schema a grammar carries: the request's, with Fireworks' objects closed."""
    return json.loads(grammar)["grammars"][0]["json_schema"]


def _matches(lltok: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar admits exactly `text`, then EOS."""
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return (
        matcher.consume_tokens(lltok.tokenize_str(text))
        and matcher.is_accepting()
        and matcher.consume_token(lltok.eos_token)
    )


def _admits(lltok: llguidance.LLTokenizer, schema: Any, instance: Any) -> bool:
    grammar = response_format_grammar(_json_schema(schema))
    return _matches(lltok, grammar, json.dumps(instance, ensure_ascii=False))


def test_corpus_is_large_and_named_once():
    names = [name for name, _, _ in SCHEMAS]
    assert len(names) >= 32 and len(set(names)) == len(names)
    assert {name for name, _ in REJECTED} <= set(names)


@pytest.mark.parametrize("rf", [None, {"type": "text"}])
def test_no_constraint(rf):
    assert response_format_grammar(rf) is None


@pytest.mark.parametrize("name, schema, instance", SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_schema_compiles_and_admits_its_instance(lltok, name, schema, instance):
    jsonschema.validate(instance, schema)
    grammar = response_format_grammar(_json_schema(schema))
    jsonschema.validate(instance, _carried(grammar))
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok) == (False, [])
    assert _matches(lltok, grammar, json.dumps(instance, ensure_ascii=False))


@pytest.mark.parametrize("name, instance", REJECTED, ids=[r[0] for r in REJECTED])
def test_grammar_rejects(lltok, name, instance):
    grammar = response_format_grammar(_json_schema(BY_NAME[name]))
    assert not _matches(lltok, grammar, json.dumps(instance, ensure_ascii=False))
    with pytest.raises(jsonschema.ValidationError):  # and jsonschema agrees
        jsonschema.validate(instance, _carried(grammar))


@pytest.mark.parametrize("name, rf, expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_response_format_is_refused(lltok, name, rf, expected):
    try:
        grammar = response_format_grammar(rf)
    except APIError as e:
        assert (e.status, e.param) == (400, "response_format")
        assert expected in e.message
        return
    # Compiled only against the tokenizer, as the engine does: the error names the keyword.
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    assert is_error and expected in messages[0]


def test_whitespace_is_exactly_json_dumps(lltok):
    schema = {"type": "object", "properties": {"a": {"type": "array", "maxItems": 3}}}
    grammar = response_format_grammar(_json_schema(schema))
    assert _matches(lltok, grammar, '{"a": [1, "b"]}')
    for text in ['{"a":[1,"b"]}', '{"a": [1,"b"]}', '{ "a": [1, "b"]}', '{"a":\n[1, "b"]}']:
        assert not _matches(lltok, grammar, text)
    # A client's own x-guidance cannot turn free whitespace back on.
    loose = {**schema, "x-guidance": {"whitespace_flexible": True}}
    assert not _matches(lltok, response_format_grammar(_json_schema(loose)), '{"a":  []}')


def test_json_object_is_any_object_or_its_schema(lltok):
    grammar = response_format_grammar({"type": "json_object"})
    assert _matches(lltok, grammar, '{"x": [1, {"y": null}], "z": "w"}')
    assert not _matches(lltok, grammar, "[1]")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    grammar = response_format_grammar({"type": "json_object", "schema": schema})
    assert _matches(lltok, grammar, '{"n": 1}')
    assert not _matches(lltok, grammar, '{"n": 1, "m": 2}')  # closed, as json_schema's


def test_json_schema_forms_and_fields(lltok):
    schema = {"enum": ["a", "b"]}
    spec = {"name": "t", "description": "d", "strict": True, "schema": schema}
    for rf in [
        {"type": "json_schema", "json_schema": spec},
        {"type": "json_schema", "schema": schema},
    ]:
        assert _matches(lltok, response_format_grammar(rf), '"b"')


def test_boolean_schema_true_admits_any_value(lltok):
    assert _admits(lltok, True, [1, "a", {"b": None}])


def test_request_is_not_mutated():
    rf = _json_schema(BY_NAME["allof_with_ref"])
    before = copy.deepcopy(rf)
    response_format_grammar(rf)
    assert rf == before


def test_allof_closes_once_over_the_members_properties(lltok):
    a = {"properties": {"a": {"type": "integer"}}, "required": ["a"]}
    b = {"properties": {"b": {"type": "boolean"}}}
    schema = {"type": "object", "allOf": [a, b]}
    carried = _carried(response_format_grammar(_json_schema(schema)))
    assert carried["allOf"] == [a, b]  # members as sent
    assert carried["additionalProperties"] is False
    assert list(carried["properties"]) == ["a", "b"]
    assert _admits(lltok, schema, {"a": 1, "b": True})
    assert _admits(lltok, schema, {"a": 1})
    assert not _admits(lltok, schema, {"a": 1, "b": True, "c": 0})
    # Closing each member instead would forbid the other's key: nothing but {"a": ...} fits.
    each = {"allOf": [{**a, "additionalProperties": False}, {**b, "additionalProperties": False}]}
    assert not _admits(lltok, each, {"a": 1, "b": True})


def test_allof_member_that_admits_other_keys_keeps_the_object_open(lltok):
    schema = {"allOf": [{"properties": {"a": {}}, "additionalProperties": True}]}
    assert _admits(lltok, schema, {"a": 1, "z": 2})


def test_nested_allof_inside_anyof_members(lltok):
    ab = {"allOf": [{"properties": {"a": {"const": 1}}}, {"properties": {"b": {"const": 2}}}]}
    schema = {"anyOf": [ab, {"properties": {"c": {"const": 3}}}]}
    assert _admits(lltok, schema, {"a": 1, "b": 2})
    assert _admits(lltok, schema, {"c": 3})
    assert not _admits(lltok, schema, {"a": 1, "c": 3})


def test_explicit_additional_properties_are_kept(lltok):
    base = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    assert _admits(lltok, {**base, "additionalProperties": True}, {"id": 1, "x": [True]})
    typed = {**base, "additionalProperties": {"type": "integer"}}
    assert _admits(lltok, typed, {"id": 1, "x": 2})
    assert not _admits(lltok, typed, {"id": 1, "x": "2"})


def test_gbnf_grammar(lltok):
    gbnf = 'root ::= answer " " [0-9]{1,2}\nanswer ::= "yes" | "no"  # a comment\n'
    grammar = response_format_grammar({"type": "grammar", "grammar": gbnf})
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok) == (False, [])
    assert _matches(lltok, grammar, "yes 42")
    assert _matches(lltok, grammar, "no 7")
    assert not _matches(lltok, grammar, "maybe 1")
    assert not _matches(lltok, grammar, "yes 123")
