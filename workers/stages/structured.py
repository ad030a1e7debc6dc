"""Structured output (generation.structured, input.schema_column): two stages around generation.

ask_structured gives each request its row's constraint: the row's own schema
when its schema column is set (a batch line's response_format), else the job's. The engine then masks every
step to what the constraint allows (both engines build the same grammar).

check_structured runs each finished sequence's token ids through a fresh
matcher of its constraint, on either engine and for row-cache hits alike
(the check is deterministic). A sequence that does not satisfy it is a dead
letter, never a row of data/: `structured_incomplete` when max_new_tokens
came first, `structured_invalid` otherwise. The rest get the columns
`structured` (the constraint's kind) and `json_parsed`.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa

from jobs.core import openai_batch, structured
from jobs.core.prompts import BAD_SCHEMA, STRUCTURED_INCOMPLETE, STRUCTURED_INVALID, RowError
from jobs.core.rows import JSON_PARSED, STRUCTURED, is_batch
from jobs.core.spec import JobSpec
from jobs.core.structured import Structured
from workers.grammar import Grammars
from workers.stages.stage import Columns, Stage
from workers.stages.work import Generated, ShardWork


class AskStructured(Stage):
    name = "ask_structured"

    def __init__(self, spec: JobSpec):
        self.column = spec.input.schema_column
        self.job = structured.from_spec(spec.generation.structured) if spec.generation.structured is not None else None
        self.batch = is_batch(spec.input)  # a batch line's response_format / structured_outputs
        g = spec.generation
        # What the spec refuses beside a job's constraint, and a batch line's would meet: stop strings
        # cut the text short of it, a banned n-gram can be all it allows next.
        self.refused_beside = [why for why, on in (
            ("generation.reasoning (the constraint would apply to the thinking too)", g.reasoning != "off"),
            ("generation.stop (a stop string could cut the answer short of its constraint)", bool(g.stop)),
            ("generation.no_repeat_ngram_size (it could ban every token the constraint allows)", g.no_repeat_ngram_size > 0),
        ) if on]  # fmt: skip

    def run(self, work: ShardWork) -> ShardWork:
        constraints, errors = {}, dict(work.row_errors)
        for i in work.prompts:
            try:
                constraints[i] = self.constraint(work.rows[i])
            except RowError as e:
                errors[i] = e
        stride = work.stride
        requests = [replace(r, structured=constraints[r.key // stride]) for r in work.requests if r.key // stride not in errors]
        return replace(work, requests=requests, row_errors=errors)

    def constraint(self, row: dict) -> Structured | None:
        """The row's constraint; RowError when its own schema is unusable (validation refuses such
        an input before the job starts: this is for an input that changed since)."""
        if self.batch:  # the line parses (its prompt rendered); openai_batch checked its constraint
            asked = openai_batch.request_of(row)
            if asked.structured is not None and self.refused_beside:  # as the spec refuses for a job's
                raise RowError(
                    openai_batch.BAD_REQUEST,
                    f"line {row['line']}: a structured answer is not supported with {self.refused_beside[0]}",
                )
            return None if asked.unconstrained else asked.structured or self.job
        text = row[self.column] if self.column is not None else None
        if text is None:
            return self.job
        try:
            return structured.row_schema(text)
        except ValueError as e:
            raise RowError(BAD_SCHEMA, f"input.schema_column {self.column!r} {e}") from None


class CheckStructured(Stage):
    name = "check_structured"
    needs = frozenset({"token_ids"})

    def __init__(self, spec: JobSpec, tokenizer):
        # Masks are the engine's; here only matchers, so the model's width does not matter.
        self.grammars = Grammars(tokenizer, len(tokenizer), structured.flexible(spec), threads=1)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=(STRUCTURED, JSON_PARSED))

    def run(self, work: ShardWork) -> ShardWork:
        checked, errors = {}, dict(work.sequence_errors)
        for _, _, key, g in work.each_generated():
            r = work.asked(key)
            if r.structured is None:
                checked[key] = _with_columns(g, None, None)
                continue
            whole, why = self.grammars.satisfied(r.structured, g.token_ids)
            if whole and r.structured.kind in structured.JSON_KINDS and not _parses(g.text):
                whole, why = False, "its tokens do, but its text is not JSON (cut by a stop string?)"
            if whole:
                parsed = _parses(g.text) if r.structured.kind in structured.JSON_KINDS else None
                checked[key] = _with_columns(g, r.structured.kind, parsed)
            elif g.finish_reason == "length":
                errors[key] = RowError(
                    STRUCTURED_INCOMPLETE,
                    f"max_new_tokens {r.max_new_tokens} reached before the completion satisfied its "
                    f"{structured.kind_name(r.structured)}; raise generation.max_new_tokens (or the row's own limit)",
                )
            else:
                errors[key] = RowError(
                    STRUCTURED_INVALID,
                    f"the completion does not satisfy its {structured.kind_name(r.structured)}: "
                    f"{why or 'it ended before the constraint was whole'}",
                )
        # A dead letter leaves `generated`: no filter, score or cache entry is made of it.
        return replace(work, generated=checked, sequence_errors=errors)


def _with_columns(g: Generated, kind: str | None, parsed: bool | None) -> Generated:
    return replace(g, columns={**g.columns, STRUCTURED.name: kind, JSON_PARSED.name: parsed})


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
