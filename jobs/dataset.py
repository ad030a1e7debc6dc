"""The input dataset as the driver sees it: file list, footers and schema checks.

The driver reads Parquet footers (row counts, schema) and, when an id column
is given, that one column to check ids are unique (with shards.group_by_prefix:
on, the prompt columns too, for each row's prefix key); it holds no prompt rows
(except `bulkgen validate`'s scan, a shard at a time, and memory:// input,
which only the driver's process can read). An OpenAI batch file has no
footer: the driver streams it once, line by line, to count its rows, check its
custom_ids and add up the samples its requests ask for.
"""

from __future__ import annotations

import logging
import posixpath
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.core import storage
from jobs.core.errors import InputError
from jobs.core.openai_batch import request_of
from jobs.core.plan import InputFile, Shard, plan, plan_grouped
from jobs.core.prefix import PREFIX_CHARS, text_prefix_key
from jobs.core.prompts import RowError, decode_rows, render_prompt
from jobs.core.rows import BATCH_FIELDS, BATCH_ID, batch_row, is_batch, iter_batch_lines, one_line
from jobs.core.spec import InputSpec, JobSpec
from jobs.snapshot import PinnedFile, pin_files

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Dataset:
    files: tuple[InputFile, ...]
    schema: pa.Schema  # of the first file; every file is checked for the needed columns
    # Rows that fix their own number of samples (a batch request's n; a line that does not
    # parse, its one dead letter), and those samples. Every other row takes the spec's n.
    own_n_rows: int = 0
    own_n_samples: int = 0

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def output_rows(self, n: int) -> int:
        """The (id, sample_index) rows the job writes, `n` the spec's samples per row."""
        return self.own_n_samples + (self.num_rows - self.own_n_rows) * n


def list_input_files(
    uri: str, storage_options: dict, suffix: str = ".parquet"
) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Resolve `uri` (file, directory or glob) to (fs, root, sorted file paths); a directory
    contributes the files below it whose names end in `suffix`."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if is_glob(path):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
        root = glob_root(path)
    elif fs.isdir(path):
        root = path.rstrip("/")
        paths = [p for p in fs.find(path) if p.endswith(suffix) and not _hidden(posixpath.relpath(p, root))]
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    else:
        raise InputError(f"input.uri {uri!r} does not exist")
    if not paths:
        raise InputError(f"input.uri {uri!r} matches no {'Parquet' if suffix == '.parquet' else suffix} files")
    return fs, root, sorted(paths)


def is_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def glob_root(path: str) -> str:
    """The directory a glob's matches are relative to: the one above its first wildcard."""
    return path[: min(path.find(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]


def _hidden(relpath: str) -> bool:
    # The convention Spark, pyarrow.dataset and our own output share:
    # _SUCCESS, _staging/, .tmp files are not data.
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


def read_footers(fs: fsspec.AbstractFileSystem, root: str, paths: list[str]) -> tuple[list[InputFile], list[pa.Schema]]:
    """Read every file's footer (in parallel: on object storage each is a round trip)."""

    def footer(path: str) -> tuple[InputFile, pa.Schema]:
        try:
            with fs.open(path, "rb") as f:
                meta = storage.open_parquet(f).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise InputError(f"input file {fs.unstrip_protocol(path)} is not readable Parquet: {e}") from e
        relpath = posixpath.relpath(path, root) if root else path
        return InputFile(fs.unstrip_protocol(path), relpath, meta.num_rows), meta.schema.to_arrow_schema()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(footer, paths))
    return [r[0] for r in results], [r[1] for r in results]


def open_dataset(spec: InputSpec) -> Dataset:
    """List and check the input; raises before any model or cluster is touched."""
    if is_batch(spec):
        return open_batch_dataset(spec)
    with storage.reaching("input.uri", spec.uri, InputError):
        fs, root, paths = list_input_files(spec.uri, spec.storage_options)
    files, schemas = read_footers(fs, root, paths)
    for f, schema in zip(files, schemas):
        check_schema(spec, schema, f.url)
    log.info("input: %d files, %d rows", len(files), sum(f.num_rows for f in files))
    return Dataset(tuple(files), schemas[0])


def open_batch_dataset(spec: InputSpec) -> Dataset:
    """List the batch files and read each once: its rows (non-blank lines), unique custom_ids,
    and the samples its requests ask for. Keeps 8 bytes per row (a hash of its id), not the requests."""
    with storage.reaching("input.uri", spec.uri, InputError):
        fs, root, paths = list_input_files(spec.uri, spec.storage_options, suffix=".jsonl")
    files, hashes, own_n_rows, own_n_samples = [], array("q"), 0, 0
    for path in paths:
        url, relpath = fs.unstrip_protocol(path), posixpath.relpath(path, root) if root else path
        rows = 0
        for index, line, text in iter_batch_lines(url, spec.storage_options):
            row = batch_row(relpath, index, line, text)
            hashes.append(hash(row[BATCH_ID]))
            request = request_of(row)
            if request is None or request.n is not None:
                own_n_rows += 1
                own_n_samples += request.n if request is not None else 1
            rows += 1
        files.append(InputFile(url, relpath, rows))
    _check_unique_custom_ids(spec, files, hashes)
    log.info("input: %d batch files, %d requests", len(files), sum(f.num_rows for f in files))
    return Dataset(tuple(files), pa.schema(BATCH_FIELDS), own_n_rows, own_n_samples)


def _check_unique_custom_ids(spec: InputSpec, files: list[InputFile], hashes: array) -> None:
    """Raise InputError naming a duplicated custom_id and both its lines."""
    suspects = _repeated(np.array(hashes, dtype=np.int64))
    if not suspects:
        return
    seen: dict[str, tuple[InputFile, int]] = {}
    for file in files:
        for index, line, text in iter_batch_lines(file.url, spec.storage_options):
            key = batch_row(file.relpath, index, line, text)[BATCH_ID]
            if hash(key) not in suspects:
                continue
            if key in seen:
                first, first_line = seen[key]
                where = (f"lines {first_line} and {line} of {file.url}" if first is file
                         else f"line {first_line} of {first.url} and line {line} of {file.url}")  # fmt: skip
                raise InputError(f"custom_id {key!r} is not unique: it is on {where}; give every request its own")
            seen[key] = (file, line)


def check_schema(spec: InputSpec, schema: pa.Schema, where: str) -> None:
    """Every column the spec names must exist, with a usable type."""
    names = set(schema.names)
    fields = [
        ("input.prompt_column", [spec.prompt_column] if spec.prompt_column else []),
        ("input.messages_column", [spec.messages_column] if spec.messages_column else []),
        ("input.prompt_template", list(spec.source_columns()) if spec.prompt_template else []),
        ("input.id_column", [spec.id_column] if spec.id_column else []),
        ("input.pass_through", list(spec.pass_through)),
        ("input.max_new_tokens_column", [spec.max_new_tokens_column] if spec.max_new_tokens_column else []),
        ("input.adapter_column", [spec.adapter_column] if spec.adapter_column else []),
        ("input.schema_column", [spec.schema_column] if spec.schema_column else []),
    ]
    for field, columns in fields:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(
                f"{field} names column(s) {missing} that {where} does not have; its columns are {sorted(names)}"
            )
    _check_type(spec, schema, where)


def _check_type(spec: InputSpec, schema: pa.Schema, where: str) -> None:
    """The columns the prompt and the ids come from must hold what bulkgen reads from them."""

    def refuse(field: str, column: str, expected: str) -> None:
        raise InputError(
            f"{field} {column!r} in {where} has type {schema.field(column).type}; expected {expected}"
        )

    if spec.prompt_column and not is_text(schema.field(spec.prompt_column).type):
        refuse("input.prompt_column", spec.prompt_column, "text (string)")
    if spec.messages_column and not _is_messages(schema.field(spec.messages_column).type):
        refuse("input.messages_column", spec.messages_column, "a list of {role, content} structs of strings")
    if spec.id_column and _is_nested(schema.field(spec.id_column).type):
        refuse("input.id_column", spec.id_column, "scalar ids (strings or integers), not lists, structs or maps")
    if spec.max_new_tokens_column and not pa.types.is_integer(schema.field(spec.max_new_tokens_column).type):
        refuse("input.max_new_tokens_column", spec.max_new_tokens_column, "integers")
    if spec.adapter_column and not is_text(schema.field(spec.adapter_column).type):
        refuse("input.adapter_column", spec.adapter_column, "text (adapter names)")
    if spec.schema_column and not is_text(schema.field(spec.schema_column).type):
        refuse("input.schema_column", spec.schema_column, "text (a JSON schema as a JSON string)")


def is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_messages(kind: pa.DataType) -> bool:
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return False
    item = kind.value_type
    if not pa.types.is_struct(item):
        return False
    fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(name in fields and is_text(fields[name]) for name in ("role", "content"))


def _is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_null(kind)


def check_unique_ids(spec: InputSpec, dataset: Dataset) -> None:
    """Raise InputError naming a duplicated, null, NaN or undecodable id, or a file whose id
    column cannot be read.

    Streams the id column one row group at a time and keeps 8 bytes per row
    (a hash), so memory stays far below the dataset's. A batch file's custom_ids were
    checked when it was opened (its one read of every line)."""
    if not spec.id_column or is_batch(spec):
        return
    hashes = np.empty(dataset.num_rows, dtype=np.int64)
    filled = 0
    for ids, file, offset in _iter_ids(spec, dataset):
        values = _usable_ids(spec, ids, file, offset)
        hashes[filled : filled + len(values)] = [hash(v) for v in values]
        filled += len(values)
    suspects = _repeated(hashes[:filled])
    if not suspects:
        return
    seen: dict = {}
    for ids, file, _ in _iter_ids(spec, dataset):
        for value in ids.to_pylist():
            if hash(value) in suspects:
                if value in seen:
                    raise InputError(
                        f"input.id_column {spec.id_column!r} is not unique: {value!r} appears in {seen[value]} "
                        f"and {file.url}"
                    )
                seen[value] = file.url


def _usable_ids(spec: InputSpec, ids: pa.Array, file: InputFile, offset: int) -> list:
    """The ids as Python values; InputError naming the row (0-based, in the file) of the first
    id that cannot identify a row: null, NaN (it would be written as "nan" and equal no
    other NaN), or a string that is not UTF-8."""

    def refuse(index: int, what: str) -> NoReturn:
        raise InputError(
            f"input.id_column {spec.id_column!r} is {what} in row {offset + index} of {file.url}; "
            "give every row an id of its own"
        )

    if ids.null_count:
        refuse(pc.index(ids.is_null(), True).as_py(), "null")
    if pa.types.is_floating(ids.type) and pc.any(pc.is_nan(ids)).as_py():
        refuse(pc.index(pc.is_nan(ids), True).as_py(), "NaN")
    try:
        return ids.to_pylist()
    except UnicodeDecodeError:
        refuse(next(i for i in range(len(ids)) if not _decodes(ids.slice(i, 1))), "not valid UTF-8")


def _decodes(value: pa.Array) -> bool:
    try:
        value.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _repeated(hashes: np.ndarray) -> set[int]:
    """The id hashes that occur more than once: where a duplicate may be (hashes can
    collide, so the caller confirms on the ids themselves)."""
    order = np.sort(hashes)
    return set(order[1:][order[1:] == order[:-1]].tolist())


def _iter_ids(spec: InputSpec, dataset: Dataset):
    return iter_column(spec, dataset, "id_column")


def iter_column(spec: InputSpec, dataset: Dataset, field: str):
    """(values, file, offset of the row group in the file) of the column input.<field> names,
    one row group at a time."""
    column = getattr(spec, field)
    for table, file, offset in iter_row_groups(spec, dataset, [column], f"input.{field} {column!r}"):
        yield table.column(0).combine_chunks(), file, offset


def iter_row_groups(spec: InputSpec, dataset: Dataset, columns: list[str], what: str):
    """(table of `columns`, file, offset of the row group in the file) of every row group, in order:
    the driver reads a column or two of the input, never a whole file at once. `what`: the columns
    as an error names them (the spec field)."""
    for file in dataset.files:
        for table, offset in _iter_file_row_groups(spec, file, columns, what):
            yield table, file, offset


def _iter_file_row_groups(spec: InputSpec, file: InputFile, columns: list[str], what: str):
    """(table of `columns`, offset of the row group in the file) of each of the file's row groups."""
    with fsspec.open(file.url, "rb", **spec.storage_options) as f:
        pf = storage.open_parquet(f)
        offset = 0
        for group in range(pf.num_row_groups):
            table = _read_row_group(pf, group, file, columns, what)
            yield table, offset
            offset += table.num_rows


def _read_row_group(pf: pq.ParquetFile, group: int, file: InputFile, columns: list[str], what: str) -> pa.Table:
    """One row group's `columns`; InputError naming the file where its pages cannot be read
    (pyarrow raises a bare OSError for a corrupt page)."""
    try:
        return storage.with_retries(
            lambda: pf.read_row_group(group, columns=columns, use_threads=False), f"reading {what} of row group {group} of {file.url}"
        )
    except OSError as e:
        raise InputError(
            f"input file {file.url} is not readable Parquet: {what} of its row group {group} cannot be read "
            f"({one_line(e)}); write the file again, or remove it from input.uri"
        ) from e


def plan_shards(spec: JobSpec, files: Sequence[InputFile], rows_per_shard: int) -> list[Shard]:
    """The job's shards: row ranges (jobs/core/plan.py plan), or with shards.group_by_prefix: on,
    a prefix key's rows together (plan_by_prefix)."""
    if spec.shards.group_by_prefix == "on":
        return plan_by_prefix(spec.input, files, rows_per_shard)
    return plan(files, rows_per_shard)


def plan_by_prefix(spec: InputSpec, files: Sequence[InputFile], rows_per_shard: int) -> list[Shard]:
    """shards.group_by_prefix: on: the shards of plan_grouped, keyed by prefix_keys. The input is
    pinned (jobs/snapshot.py refuses a changed one) and the keys are a function of its rows
    alone, so every run of the job computes the same plan; the driver checks that it did."""
    return plan_grouped(files, lambda file: prefix_keys(spec, file), rows_per_shard)


def prefix_keys(spec: InputSpec, file: InputFile) -> list[int | None]:
    """Each row's prefix key (jobs/core/prefix.py's text_prefix_key of its prompt text), None for
    a row whose prompt is shorter than the key or cannot be rendered (it fails in its shard as
    it would anyway). Reads the prompt's source columns a row group at a time: the driver keeps
    a key per row of one file, never the prompts."""
    columns = list(spec.source_columns())
    keys: list[int | None] = []
    for table, _ in _iter_file_row_groups(spec, file, columns, f"the prompt columns {columns}"):
        rows, undecodable = decode_rows(table)
        for i, row in enumerate(rows):
            text = None if i in undecodable else prompt_key_text(spec, row)
            keys.append(text_prefix_key(text) if text is not None and len(text) >= PREFIX_CHARS else None)
    return keys


def prompt_key_text(spec: InputSpec, row: dict) -> str | None:
    """The text a row's prefix key is read from: its rendered prompt, or for a chat its messages'
    roles and contents in order (what a chat template renders them from, so rows that share a
    system prompt share this text's start too; no tokenizer needed). None for a row that would
    fail to render."""
    if spec.messages_column:
        messages = row[spec.messages_column]
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return None
        return "".join(f"<{m.get('role')}>\n{m['content']}\n" for m in messages)
    try:
        return render_prompt(spec, row, tokenizer=None)
    except RowError:
        return None


def pin_input(spec: InputSpec, files: Sequence[InputFile] | None = None) -> list[PinnedFile]:
    """The input's files as they are now, each with its size and version stamp: one listing
    and a stat per file, no reads. With `files` (the footers validation read), exactly those
    files, with their row counts."""
    with storage.reaching("input.uri", spec.uri, InputError):
        if files is not None:
            fs, _ = fsspec.core.url_to_fs(spec.uri, **spec.storage_options)
            return pin_files(fs, [(f.url, f.relpath, f.num_rows) for f in files])
        fs, root, paths = list_input_files(spec.uri, spec.storage_options, ".jsonl" if is_batch(spec) else ".parquet")
        listed = [(fs.unstrip_protocol(p), posixpath.relpath(p, root) if root else p, None) for p in paths]
        return pin_files(fs, listed)
