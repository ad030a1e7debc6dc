"""Structured output's contract: what a sequence's text must satisfy (generation.structured,
a row's schema column, a batch body's response_format), its grammar, and checks that need no model.

A constraint is a JSON schema, any JSON object, a regular expression or a
list of choices. Both engines build the same llguidance grammar from it:
`grammar` is line for line vLLM 0.32's guidance backend
(serialize_guidance_grammar), so the transformers engine (workers/grammar.py)
masks exactly the tokens vLLM masks (tests compare the strings). llguidance is
imported inside the functions: only a job that may constrain needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from jobs.core.spec import JobSpec, StructuredSpec

Kind = Literal["json_schema", "json_object", "regex", "choice"]
JSON_KINDS = ("json_schema", "json_object")  # kinds whose completions are JSON text


@dataclass(frozen=True)
class Structured:
    kind: Kind
    # json_schema: the schema as JSON text (its key order kept); regex: the pattern;
    # choice: the choices; json_object: None.
    value: str | tuple[str, ...] | None = None


def from_spec(spec: StructuredSpec) -> Structured | None:
    """The job's constraint; None when it names none (input.schema_column gives each row its own)."""
    if spec.json_schema is not None:
        return Structured("json_schema", canonical_json(spec.json_schema))
    if spec.regex is not None:
        return Structured("regex", spec.regex)
    if spec.choices is not None:
        return Structured("choice", tuple(spec.choices))
    if spec.json_object:
        return Structured("json_object")
    return None


def from_schema_text(text: str) -> Structured:
    """A row's JSON schema, written as JSON text; ValueError saying why when it is not JSON or no object."""
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ValueError(f"is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"is JSON {type(schema).__name__}, not a JSON schema object")
    return Structured("json_schema", canonical_json(schema))


def row_schema(text: str) -> Structured:
    """A row's schema (input.schema_column), checked; ValueError saying what is wrong with it."""
    s = from_schema_text(text)
    why = problem(s)
    if why is not None:
        raise ValueError(f"has a schema llguidance cannot use: {why}")
    return s


def canonical_json(schema: dict) -> str:
    """A schema as compact JSON text with its keys in the order written: llguidance emits an
    object's properties in the schema's order, so the order decides the completions."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def grammar(s: Structured, flexible: bool) -> str:
    """The llguidance grammar of a constraint; `flexible`: JSON may have whitespace between tokens.
    Mirrors vLLM 0.32's serialize_guidance_grammar (vllm/v1/structured_output/backend_guidance.py)."""
    import llguidance

    defaults = {"whitespace_flexible": flexible}
    if s.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(s.value, defaults=defaults)
    if s.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=defaults)
    if s.kind == "regex":
        return llguidance.grammar_from("regex", s.value)
    return llguidance.grammar_from("choice", json.dumps(list(s.value)))


@lru_cache(4096)
def problem(s: Structured) -> str | None:
    """Why llguidance cannot use the constraint (an unimplemented schema keyword, a regex that does
    not parse), or None. Checked without a tokenizer; whitespace does not change the answer."""
    from llguidance import LLMatcher

    try:
        text = grammar(s, flexible=False)
    except ValueError as e:  # a schema that is not a JSON object
        return str(e)
    failed, messages = LLMatcher.validate_grammar_with_warnings(text, None)
    return " ".join(messages[0].split()) if failed else None


def kind_name(s: Structured) -> str:
    """The constraint as messages name it."""
    return {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choices"}[s.kind]


def flexible(spec: JobSpec) -> bool:
    """Whether JSON completions may have whitespace between tokens (generation.structured.whitespace)."""
    s = spec.generation.structured
    return s is not None and s.whitespace == "flexible"
