"""Row identity and the columns of every file a job writes.

A row's id is the spec's `id_column` when given (checked unique), else
'<file relative to the input root>:<row index>'. With num_return_sequences
= n, each id yields n rows, sample_index 0..n-1, across data/ and errors/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from jobs.core import storage
from jobs.core.plan import Shard

if TYPE_CHECKING:
    from jobs.core.spec import InputSpec, JobSpec

DERIVED_ID = "id"  # the id column's name when the spec has no id_column
METADATA_KEY = "bulkgen"  # Parquet schema metadata: the job-wide facts, as JSON
# Columns every data/ file has after the id, in order.
GENERATED = (
    pa.field("sample_index", pa.int32()),
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),  # "stop" | "length"
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
)
PROMPT = pa.field("prompt", pa.string())  # with output.include_prompt
ERROR_FIELDS = (
    pa.field("sample_index", pa.int32()),
    pa.field("error_code", pa.string()),
    pa.field("error", pa.string()),
)
WRITTEN_COLUMNS = frozenset(f.name for f in (*GENERATED, PROMPT, *ERROR_FIELDS))


def derived_id(relpath: str, index: int) -> str:
    return f"{relpath}:{index}"


def id_name(spec: InputSpec) -> str:
    return spec.id_column or DERIVED_ID


def row_ids(spec: InputSpec, shard: Shard, table: pa.Table) -> list:
    """The ids of a shard's rows, in order."""
    if spec.id_column:
        return table.column(spec.id_column).to_pylist()
    return [derived_id(shard.relpath, i) for i in range(shard.start, shard.stop)]


def input_columns(spec: InputSpec) -> list[str]:
    """The input columns a job reads: id, prompt sources, pass-through, per-row limits."""
    columns = [spec.id_column] if spec.id_column else []
    columns += [*spec.source_columns(), *spec.pass_through]
    columns += [spec.max_new_tokens_column] if spec.max_new_tokens_column else []
    return list(dict.fromkeys(columns))  # unique, in order


def read_shard_rows(spec: InputSpec, shard: Shard) -> pa.Table:
    """The input columns the job uses, for the shard's row range."""
    return storage.read_row_range(shard.url, spec.storage_options, shard.start, shard.stop, input_columns(spec))


def id_field(spec: InputSpec, input_schema: pa.Schema) -> pa.Field:
    return input_schema.field(spec.id_column) if spec.id_column else pa.field(DERIVED_ID, pa.string())


def data_fields(spec: JobSpec, input_schema: pa.Schema) -> list[pa.Field]:
    """Columns of data/: id, generated columns, prompt (optional), pass-through."""
    fields = [id_field(spec.input, input_schema), *GENERATED]
    if spec.output.include_prompt:
        fields.append(PROMPT)
    return fields + [input_schema.field(c) for c in spec.input.pass_through]


def error_fields(spec: JobSpec, input_schema: pa.Schema) -> list[pa.Field]:
    """Columns of errors/: id, sample_index, error_code, error, and every input column the job reads,
    so a dead letter can be generated again from its own row."""
    first = id_field(spec.input, input_schema)
    rest = [input_schema.field(c) for c in input_columns(spec.input) if c != first.name]
    return [first, *ERROR_FIELDS, *rest]
