"""Structured output's contract without a model: the spec's fields and their refusals, the
constraint each gives, and llguidance's checks. (That the grammars equal vLLM's is checked
where vLLM is imported, tests/workers/test_vllm_engine.py.)"""

from __future__ import annotations

import json

import pytest

from jobs.core import structured
from jobs.core.spec import spec_from_dict
from jobs.core.structured import Structured
from tests.jobs.core.test_spec import minimal, spec_error

SCHEMA = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}, "required": ["z"]}


def with_structured(structured_section: dict | None, **generation) -> dict:
    return minimal(generation={"structured": structured_section, **generation})


@pytest.mark.parametrize(
    "section, constraint",
    [
        ({"json_schema": SCHEMA}, Structured("json_schema", json.dumps(SCHEMA, separators=(",", ":")))),
        ({"regex": "[a-z]{3}"}, Structured("regex", "[a-z]{3}")),
        ({"choices": ["yes", "no"]}, Structured("choice", ("yes", "no"))),
        ({"json_object": True}, Structured("json_object")),
    ],
)
def test_each_constraint_of_the_spec(section, constraint):
    spec = spec_from_dict(with_structured(section))
    assert structured.from_spec(spec.generation.structured) == constraint
    assert structured.problem(constraint) is None
    assert not structured.flexible(spec)


def test_a_schema_keeps_its_key_order():
    # llguidance writes properties in the schema's order: z before a here, so the order is the constraint.
    spec = spec_from_dict(with_structured({"json_schema": SCHEMA}))
    text = structured.from_spec(spec.generation.structured).value
    assert text.index('"z"') < text.index('"a"')
    assert structured.from_schema_text(json.dumps(SCHEMA, indent=2)).value == text


def test_whitespace_is_compact_unless_asked():
    spec = spec_from_dict(with_structured({"regex": "a", "whitespace": "flexible"}))
    assert structured.flexible(spec)
    assert not structured.flexible(spec_from_dict(minimal()))


@pytest.mark.parametrize(
    "section, field, message",
    [
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "generation.structured.json_schema",
         'llguidance cannot use this schema: Unimplemented keys: ["uniqueItems"]'),
        ({"json_schema": {"$ref": "#/defs/x"}}, "generation.structured.json_schema",
         "llguidance cannot use this schema: "),
        ({"regex": "a(b"}, "generation.structured.regex", "not a regular expression llguidance takes: "),
        ({"choices": []}, "generation.structured.choices", "give at least one choice"),
        ({"choices": ["yes", ""]}, "generation.structured.choices", "a choice must not be empty"),
        ({"regex": "a", "choices": ["a"]}, "generation.structured",
         "give one of json_schema, regex, choices, json_object: true (got ['regex', 'choices'])"),
        ({"whitespace": "pretty"}, "generation.structured.whitespace", "Input should be 'compact' or 'flexible'"),
    ],
)  # fmt: skip
def test_bad_constraints_name_the_field(section, field, message):
    error = spec_error(with_structured(section))
    assert f"{field}: {message}" in error


def test_a_regex_error_says_where():
    assert "unclosed group" in spec_error(with_structured({"regex": "a(b"}))


def test_a_schema_must_be_json():
    import datetime

    error = spec_error(with_structured({"json_schema": {"const": datetime.date(2024, 1, 1)}}))
    assert "generation.structured.json_schema: not a JSON schema" in error


def test_structured_names_a_constraint_unless_rows_bring_their_own():
    assert "generation.structured names no constraint" in spec_error(with_structured({}))
    assert "generation.structured names no constraint" in spec_error(with_structured({"json_object": False}))
    data = with_structured({"whitespace": "flexible"})
    data["input"]["schema_column"] = "schema"
    spec = spec_from_dict(data)
    assert structured.from_spec(spec.generation.structured) is None and structured.flexible(spec)


@pytest.mark.parametrize("source", ["generation.structured", "input.schema_column"])
@pytest.mark.parametrize(
    "generation, message",
    [
        ({"stop": ["}"]}, "generation.stop could cut a structured completion short of its constraint; drop "
                          "generation.stop or {source}"),
        ({"no_repeat_ngram_size": 2}, "generation.no_repeat_ngram_size could ban every token the constraint of "
                                      "{source} allows; drop one of them"),
    ],
)  # fmt: skip
def test_settings_that_could_break_a_constraint_are_refused(source, generation, message):
    if source == "generation.structured":
        data = with_structured({"regex": "[a-z]+"}, **generation)
    else:
        data = minimal(input={"schema_column": "schema"}, generation=generation)
    assert message.format(source=source) in spec_error(data)


def test_schema_column_takes_a_name_and_no_batch_input():
    assert "input.schema_column: a column name must not be empty" in spec_error(minimal(input={"schema_column": ""}))
    batch = {"input": {"uri": "/r.jsonl", "schema_column": "s"}, "model": {"path": "m"}, "output": {"uri": "/o"}}
    assert "drop ['schema_column']" in spec_error(batch)


def test_schema_column_may_not_shadow_an_output_column():
    # errors/ holds every input column the job reads, so a dead letter can be generated again.
    error = spec_error(minimal(input={"schema_column": "error"}))
    assert "errors/ would have the column 'error' twice, from input.schema_column and the error columns" in error


def test_row_schemas_are_checked_as_text():
    assert structured.row_schema('{"type": "string"}') == Structured("json_schema", '{"type":"string"}')
    with pytest.raises(ValueError, match=r"^is not JSON \(Expecting"):
        structured.row_schema('{"type": ')
    with pytest.raises(ValueError, match="^is JSON list, not a JSON schema object"):
        structured.row_schema("[1]")
    with pytest.raises(ValueError, match=r'^has a schema llguidance cannot use: Unimplemented keys: \["uniqueItems"\]'):
        structured.row_schema('{"uniqueItems": true}')


def test_grammars_are_llguidance_grammars_of_each_kind():
    schema = structured.grammar(Structured("json_schema", '{"type":"string"}'), flexible=True)
    assert json.loads(schema)["grammars"][0]["json_schema"]["x-guidance"] == {"whitespace_flexible": True}
    assert '"whitespace_flexible":false' in structured.grammar(Structured("json_object"), flexible=False)
    assert structured.grammar(Structured("choice", ("a b", "c")), False) == 'start: "a b" | "c"'
    assert "[0-9]+" in structured.grammar(Structured("regex", "[0-9]+"), False)
