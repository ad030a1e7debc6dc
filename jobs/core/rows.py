"""Row identity and the columns of every file a job writes.

A row's id is the spec's `id_column` when given (checked unique), else
'<file relative to the input root>:<row index>'. With num_return_sequences
= n, each id yields n rows, sample_index 0..n-1, across data/ and errors/.

An OpenAI batch file (input.format openai-batch) has a row per non-blank
line, its id the line's custom_id (checked unique; a line whose custom_id
cannot be read gets the derived id), and n is per row: the request's own n
(jobs/core/openai_batch.py). Its rows hold custom_id, line (1-based, for
messages), url and the request as written, so a dead letter holds all it
needs to be generated again.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa

from jobs.core import storage
from jobs.core.errors import InputError
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
# evaluation: sentence scores against the row's reference (sacreBLEU, rouge-score F-measures).
EVALUATION_FIELDS = [pa.field(name, pa.float64()) for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")]
FILTER = pa.field("filter", pa.string())  # filtered/: the filter that dropped the row
# generation.reasoning: the thinking (null when there was none) and, of completion_tokens, those up to the end tag.
REASONING = pa.field("reasoning", pa.string())
REASONING_TOKENS = pa.field("reasoning_tokens", pa.int32())
# generation.structured: the constraint's kind (json_schema | json_object | regex | choice; null: none), and
# for the JSON kinds whether text parses as JSON (null otherwise).
STRUCTURED = pa.field("structured", pa.string())
JSON_PARSED = pa.field("json_parsed", pa.bool_())
# generation.logprobs: per generated token (end-of-sequence excluded) its id, its logprob and, with
# top_logprobs K, the step's K most likely tokens, most likely first; and the sum over the sequence.
TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])
TOKEN_IDS = pa.field("token_ids", pa.list_(pa.int32()))
TOKEN_LOGPROBS = pa.field("token_logprobs", pa.list_(pa.float32()))
TOP_LOGPROBS = pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB)))
LOGPROB_SUM = pa.field("logprob_sum", pa.float64())
ADAPTER = pa.field("adapter", pa.string())  # model.adapters: the row's adapter; null: the base model
FEATURE_FIELDS = (REASONING, REASONING_TOKENS, STRUCTURED, JSON_PARSED, TOKEN_IDS, TOKEN_LOGPROBS, TOP_LOGPROBS,
                  LOGPROB_SUM, ADAPTER)  # fmt: skip
# The names of the columns bulkgen writes, or may write (evaluation, the features): an input column
# is never carried under one of them, even with its feature off, since the report and output.jsonl
# read them by name.
WRITTEN_COLUMNS = frozenset(f.name for f in (*GENERATED, PROMPT, *ERROR_FIELDS, *EVALUATION_FIELDS, FILTER, *FEATURE_FIELDS))

OPENAI_BATCH = "openai-batch"  # the value of input.format and output.format (jobs/core/spec.py)
BATCH_ID = "custom_id"
# The input columns of a batch file's rows.
BATCH_FIELDS = (
    pa.field(BATCH_ID, pa.string()),
    pa.field("line", pa.int64()),
    pa.field("url", pa.string()),
    pa.field("request", pa.string()),
)
BATCH_CARRIED = ("url",)  # copied to data/: output.jsonl answers a chat or a completion by it


def derived_id(relpath: str, index: int) -> str:
    return f"{relpath}:{index}"


def id_name(spec: InputSpec) -> str:
    return spec.id_column or DERIVED_ID


def is_batch(spec: InputSpec) -> bool:
    return spec.format == OPENAI_BATCH


def structured_possible(spec: JobSpec) -> bool:
    """Whether any completion of the job may be constrained (structured output): by the job's
    constraint, by its rows' own schemas, or by a batch line's response_format."""
    return spec.generation.structured is not None or spec.input.schema_column is not None or is_batch(spec.input)


def logprobs_possible(spec: JobSpec) -> bool:
    """Whether any sequence of the job may keep logprobs: the job asks, or a batch line may."""
    return spec.generation.logprobs or is_batch(spec.input)


def top_logprobs_possible(spec: JobSpec) -> bool:
    """Whether any sequence of the job may keep each step's top K (the top_logprobs column)."""
    return (spec.generation.logprobs and spec.generation.top_logprobs > 0) or is_batch(spec.input)


def row_ids(spec: InputSpec, shard: Shard, table: pa.Table) -> list:
    """The ids of a shard's rows, in order."""
    if spec.id_column:
        return table.column(spec.id_column).to_pylist()
    return [derived_id(shard.relpath, i) for i in shard.row_indices()]


def input_columns(spec: InputSpec) -> list[str]:
    """The input columns a job reads: id, prompt sources, pass-through, per-row limits, adapters and schemas."""
    if is_batch(spec):
        return [f.name for f in BATCH_FIELDS]
    columns = [spec.id_column] if spec.id_column else []
    columns += [*spec.source_columns(), *spec.pass_through]
    columns += [spec.max_new_tokens_column] if spec.max_new_tokens_column else []
    columns += [spec.adapter_column] if spec.adapter_column else []
    columns += [spec.schema_column] if spec.schema_column else []
    return list(dict.fromkeys(columns))  # unique, in order


def read_shard_rows(spec: JobSpec, shard: Shard) -> pa.Table:
    """The input columns the job reads (job_input_columns), for the shard's row range, of either
    input format: for the driver (validation's scan, process-local input); a replica's reader
    (workers/stages/) was chosen for its format once."""
    i = spec.input
    if is_batch(i):
        return read_batch_rows(shard.url, i.storage_options, shard.relpath, shard.start, shard.stop)
    return read_parquet_rows(spec, shard)


def read_parquet_rows(spec: JobSpec, shard: Shard) -> pa.Table:
    """The rows of read_shard_rows from a Parquet input: its range, or the rows a grouped shard lists."""
    i, columns = spec.input, job_input_columns(spec)
    try:
        if shard.rows is not None:
            return storage.read_rows(shard.url, i.storage_options, shard.rows, columns)
        return storage.read_row_range(shard.url, i.storage_options, shard.start, shard.stop, columns)
    except OSError as e:  # pyarrow raises a bare OSError for a corrupt page, naming no file
        raise InputError(
            f"cannot read {shard.describe_rows()} of input file {shard.url} "
            f"({type(e).__name__}: {one_line(e)}); if the file is corrupt, write it again or remove it from input.uri"
        ) from e


def one_line(error: Exception) -> str:
    """An error's message on one line (pyarrow's span several)."""
    return " ".join(str(error).split())


def extra_columns(spec: JobSpec) -> tuple[str, ...]:
    """Input columns read beside the input's own: the evaluation's references."""
    return (spec.evaluation.reference_column,) if spec.evaluation is not None else ()


def carried_columns(spec: InputSpec) -> tuple[str, ...]:
    """Input columns copied to every output row."""
    return spec.pass_through + (BATCH_CARRIED if is_batch(spec) else ())


def id_field(spec: InputSpec, input_schema: pa.Schema) -> pa.Field:
    return input_schema.field(spec.id_column) if spec.id_column else pa.field(DERIVED_ID, pa.string())


def data_fields(spec: JobSpec, input_schema: pa.Schema) -> list[pa.Field]:
    """Columns of data/: id, generated columns, prompt (optional), then each feature's that is on
    (reasoning, structured output, logprobs, the adapter), scores (evaluation), pass-through."""
    fields = [id_field(spec.input, input_schema), *GENERATED]
    if spec.output.include_prompt:
        fields.append(PROMPT)
    fields += reasoning_fields(spec)
    if structured_possible(spec):
        fields += [STRUCTURED, JSON_PARSED]
    if logprobs_possible(spec):
        fields += logprob_fields(top_logprobs_possible(spec))
    if spec.model.adapter_set():
        fields.append(ADAPTER)
    carried = list(carried_columns(spec.input))
    if spec.evaluation is not None:
        fields += EVALUATION_FIELDS
        if spec.evaluation.reference_column not in carried:  # the report's corpus scores need it
            carried.append(spec.evaluation.reference_column)
    return fields + [input_schema.field(c) for c in carried]


def reasoning_fields(spec: JobSpec) -> list[pa.Field]:
    """The thinking and its token count, when generation.reasoning keeps it apart."""
    return [REASONING, REASONING_TOKENS] if spec.generation.reasoning != "off" else []


def logprob_fields(top: bool) -> tuple[pa.Field, ...]:
    """The columns of generation.logprobs, in data/'s order; top_logprobs only when `top` (K > 0)."""
    return (TOKEN_IDS, TOKEN_LOGPROBS, *((TOP_LOGPROBS,) if top else ()), LOGPROB_SUM)


def filtered_fields(spec: JobSpec, input_schema: pa.Schema) -> list[pa.Field]:
    """Columns of filtered/: those of data/ and the name of the filter that dropped the row."""
    return [*data_fields(spec, input_schema), FILTER]


def error_fields(spec: JobSpec, input_schema: pa.Schema) -> list[pa.Field]:
    """Columns of errors/: id, sample_index, error_code, error, and every input column the job reads,
    so a dead letter can be generated again from its own row."""
    first = id_field(spec.input, input_schema)
    rest = [input_schema.field(c) for c in job_input_columns(spec) if c != first.name]
    return [first, *ERROR_FIELDS, *rest]


def job_input_columns(spec: JobSpec) -> list[str]:
    """Every input column a job reads: the input's own, then extra_columns (references)."""
    columns = input_columns(spec.input)
    return columns + [c for c in extra_columns(spec) if c not in columns]


# -- batch files: rows are lines --------------------------------------------------------


def iter_batch_lines(url: str, storage_options: dict, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, str]]:
    """(row index, 1-based line number, text) of a batch file's rows [start, stop): its non-blank lines,
    as vLLM's run-batch counts them. Streams the file up to `stop`; nothing after it is read."""
    with fsspec.open(url, "rb", **storage_options) as f:
        index = 0
        for number, raw in enumerate(f, 1):
            if number == 1:  # a UTF-8 BOM (some editors write one) is no part of the first request
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield index, number, _line_text(raw)
            index += 1


# Marks a line that is not valid UTF-8, whose text then holds U+FFFD where its bytes were not:
# U+FFFE is a Unicode noncharacter, kept for such internal use, and cannot begin a JSON line
# either, so no request that parses is ever marked (openai_batch.parse_request refuses it).
NOT_UTF8 = "\ufffe"


def _line_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return NOT_UTF8 + raw.decode("utf-8", "replace").strip()


def custom_id_of(text: str) -> str | None:
    """A line's custom_id, when it has a readable one (a non-empty string)."""
    return _readable_custom_id(_json_object(text.removeprefix(NOT_UTF8)))


def batch_row(relpath: str, index: int, line: int, text: str) -> dict:
    """A batch line as a row; its id is its custom_id, or the derived id when it has none."""
    doc = _json_object(text.removeprefix(NOT_UTF8))
    url = doc.get("url")
    return {
        BATCH_ID: _readable_custom_id(doc) or derived_id(relpath, index),
        "line": line,
        "url": url if isinstance(url, str) else None,
        "request": text,
    }


def _readable_custom_id(doc: dict) -> str | None:
    custom_id = doc.get(BATCH_ID)
    return custom_id if isinstance(custom_id, str) and custom_id else None


def _json_object(text: str) -> dict:
    # Lenient on purpose (Python's json reads NaN and Infinity): a line that parse_request refuses
    # still keeps the custom_id it has, so its errors.jsonl line names the request.
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def read_batch_rows(url: str, storage_options: dict, relpath: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a batch file, as a table of BATCH_FIELDS."""

    def read() -> list[dict]:
        return [batch_row(relpath, i, line, text) for i, line, text in iter_batch_lines(url, storage_options, start, stop)]

    rows = storage.with_retries(read, f"reading lines of rows {start}:{stop} of {url}")
    return pa.Table.from_pylist(rows, schema=pa.schema(BATCH_FIELDS))
