"""Turning one input row into prompt text and token ids, or a typed per-row error.

Shared by `bulkgen validate` (which scans prompts on the driver's machine)
and the replicas, so both judge a row the same way. An OpenAI batch line is
parsed apart (jobs/core/openai_batch.py) and rendered here, as a chat or a
completion prompt column."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from jobs.core.spec import InputSpec, JobSpec


class RowError(Exception):
    """A row that cannot be generated; it becomes a dead letter in errors/."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# Typed error codes written to errors/ (documented in the README).
EMPTY_PROMPT = "empty_prompt"
TEMPLATE_ERROR = "template_error"
CHAT_TEMPLATE_ERROR = "chat_template_error"
PROMPT_TOO_LONG = "prompt_too_long"
GENERATION_ERROR = "generation_error"
UNKNOWN_ADAPTER = "unknown_adapter"  # a row names no adapter of model.adapters
BAD_ENCODING = "bad_encoding"
BAD_SCHEMA = "bad_schema"  # the row's own schema (input.schema_column) is no usable JSON schema
STRUCTURED_INCOMPLETE = "structured_incomplete"  # max_new_tokens came before the constraint was satisfied
STRUCTURED_INVALID = "structured_invalid"  # the completion ended without satisfying its constraint


def decode_rows(table: pa.Table) -> tuple[list[dict[str, Any]], dict[int, RowError]]:
    """The table's rows, and a BAD_ENCODING error for each row with a string that is not valid
    UTF-8 (its value there is None). pyarrow checks no UTF-8 when it reads Parquet, and
    to_pylist raises for the whole table on one such string: one row must not fail a shard."""
    try:
        return table.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    columns, bad = {}, {}
    for name in table.column_names:
        columns[name] = _decode_column(table.column(name), name, bad)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    errors = {
        i: RowError(BAD_ENCODING, f"not valid UTF-8: {'; '.join(why)}; write the input file's strings as UTF-8")
        for i, why in bad.items()
    }
    return rows, errors


def _decode_column(column: pa.ChunkedArray, name: str, bad: dict[int, list[str]]) -> list:
    """The column's values; a value that does not decode is None, and why is added to `bad[row]`."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    values = []
    for i in range(len(column)):
        try:
            values.extend(column.slice(i, 1).to_pylist())
        except UnicodeDecodeError as e:
            values.append(None)
            near = e.object[max(0, e.start - 16) : e.end + 16]
            bad.setdefault(i, []).append(f"column {name!r} has {e.reason} at byte {e.start} (near {near!r})")
    return values


def render_prompt(spec: InputSpec, row: dict[str, Any], tokenizer, template_kwargs: dict | None = None) -> str:
    """The prompt text for `row`, or RowError; `template_kwargs`: variables for the chat template
    (a batch line's chat_template_kwargs and reasoning_effort)."""
    if spec.prompt_column:
        text = row[spec.prompt_column]
        if text is None or (isinstance(text, str) and not text.strip()):
            raise RowError(EMPTY_PROMPT, f"{spec.prompt_column} is {'null' if text is None else 'empty'}")
        if not isinstance(text, str):
            raise RowError(TEMPLATE_ERROR, f"{spec.prompt_column} is {type(text).__name__}, not text")
        return text
    if spec.prompt_template:
        values = {name: row[name] for name in spec.source_columns()}
        nulls = [name for name, v in values.items() if v is None]
        if nulls:
            raise RowError(TEMPLATE_ERROR, f"prompt_template needs {nulls}, which are null in this row")
        try:
            text = spec.prompt_template.format(**values)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RowError(TEMPLATE_ERROR, f"prompt_template failed on this row: {e}") from None
        if not text.strip():
            raise RowError(EMPTY_PROMPT, "prompt_template rendered an empty prompt")
        return text
    messages = row[spec.messages_column]
    if not messages:
        raise RowError(EMPTY_PROMPT, f"{spec.messages_column} is {'null' if messages is None else 'empty'}")
    malformed = [m for m in messages if not (isinstance(m, dict) and {"role", "content"} <= m.keys())]
    if malformed:
        raise RowError(CHAT_TEMPLATE_ERROR, f"{spec.messages_column} holds {malformed[0]!r}, not a {{role, content}} message")
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    except Exception as e:  # jinja2 and tokenizer errors have no common base
        raise RowError(CHAT_TEMPLATE_ERROR, f"chat template failed on this row: {type(e).__name__}: {e}") from None


def tokenize_prompt(spec: InputSpec, text: str, tokenizer) -> list[int]:
    # A chat template already wrote the special tokens it wants.
    return tokenizer(text, add_special_tokens=not spec.messages_column).input_ids


def build_prompt(
    spec: InputSpec, row: dict[str, Any], tokenizer, context: int | None, template_kwargs: dict | None = None
) -> tuple[str, list[int]]:
    """(prompt text, token ids) for `row` of an input with prompt columns, or RowError; the prompt
    must leave room for one new token. A row of any input format: jobs/core/row_prompt.py."""
    text = render_prompt(spec, row, tokenizer, template_kwargs)
    token_ids = tokenize_prompt(spec, text, tokenizer)
    if context and len(token_ids) >= context:
        raise RowError(PROMPT_TOO_LONG, f"prompt is {len(token_ids)} tokens; the model's context is {context}")
    return text, token_ids


def max_new_tokens(spec: JobSpec, row: dict[str, Any], prompt_tokens: int, context: int | None) -> int:
    """The job's limit, lowered by the row's own limit and by the room left in the context."""
    limit = spec.generation.max_new_tokens
    column = spec.input.max_new_tokens_column
    if column and row[column] is not None:
        limit = max(1, min(limit, row[column]))
    return min(limit, context - prompt_tokens) if context else limit
