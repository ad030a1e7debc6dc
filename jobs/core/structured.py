"""Structured output's contract: what a sequence's text must satisfy (generation.structured,
a row's schema column, a batch body's response_format). The grammars are built from it on
the replica (workers/grammar.py) and checked without a model by validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["json_schema", "json_object", "regex", "choice"]


@dataclass(frozen=True)
class Structured:
    kind: Kind
    # json_schema: the schema as JSON text (its key order kept); regex: the pattern;
    # choice: the choices; json_object: None.
    value: str | tuple[str, ...] | None = None
