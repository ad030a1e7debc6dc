"""The input dataset as the driver sees it: file list, footers and schema checks.

The driver reads Parquet footers (row counts, schema) and, when an id column
is given, that one column to check ids are unique. It never holds the rows.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.plan import InputFile
from jobs.spec import InputSpec

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Dataset:
    files: tuple[InputFile, ...]
    schema: pa.Schema  # of the first file; every file is checked for the needed columns

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def list_parquet_files(uri: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Resolve `uri` (file, directory or glob) to (fs, root, sorted file paths)."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if any(c in path for c in _GLOB_CHARS):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
        root = path[: min(path.find(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        root = path.rstrip("/")
        paths = [p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(posixpath.relpath(p, root))]
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    else:
        raise FileNotFoundError(f"input.uri {uri!r} does not exist")
    if not paths:
        raise FileNotFoundError(f"input.uri {uri!r} matches no Parquet files")
    return fs, root, sorted(paths)


def _hidden(relpath: str) -> bool:
    # The convention Spark, pyarrow.dataset and our own output share:
    # _SUCCESS, _staging/, .tmp files are not data.
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


def read_footers(fs: fsspec.AbstractFileSystem, root: str, paths: list[str]) -> tuple[list[InputFile], list[pa.Schema]]:
    """Read every file's footer (in parallel: on object storage each is a round trip)."""

    def footer(path: str) -> tuple[InputFile, pa.Schema]:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise ValueError(f"input file {fs.unstrip_protocol(path)} is not readable Parquet: {e}") from e
        relpath = posixpath.relpath(path, root) if root else path
        return InputFile(fs.unstrip_protocol(path), relpath, meta.num_rows), meta.schema.to_arrow_schema()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(footer, paths))
    return [r[0] for r in results], [r[1] for r in results]


def open_dataset(spec: InputSpec) -> Dataset:
    """List and check the input; raises before any model or cluster is touched."""
    fs, root, paths = list_parquet_files(spec.uri, spec.storage_options)
    files, schemas = read_footers(fs, root, paths)
    for f, schema in zip(files, schemas):
        check_schema(spec, schema, f.url)
    log.info("input: %d files, %d rows", len(files), sum(f.num_rows for f in files))
    return Dataset(tuple(files), schemas[0])


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
    ]
    for field, columns in fields:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(
                f"{field} names column(s) {missing} that {where} does not have; its columns are {sorted(names)}"
            )
    if spec.max_new_tokens_column and not pa.types.is_integer(schema.field(spec.max_new_tokens_column).type):
        raise ValueError(
            f"input.max_new_tokens_column {spec.max_new_tokens_column!r} in {where} has type "
            f"{schema.field(spec.max_new_tokens_column).type}; expected integers"
        )
    if spec.messages_column:
        kind = schema.field(spec.messages_column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            raise ValueError(
                f"input.messages_column {spec.messages_column!r} in {where} has type {kind}; "
                "expected a list of {role, content} structs"
            )


def check_unique_ids(spec: InputSpec, dataset: Dataset) -> None:
    """Raise ValueError naming a duplicated or null id.

    Streams the id column one row group at a time and keeps 8 bytes per row
    (a hash), so memory stays far below the dataset's."""
    if not spec.id_column:
        return
    hashes = np.empty(dataset.num_rows, dtype=np.int64)
    filled = 0
    for ids, file, offset in _iter_ids(spec, dataset):
        if ids.null_count:
            row = offset + ids.to_pylist().index(None)
            raise ValueError(f"input.id_column {spec.id_column!r} is null in {file.url} (a row near {row})")
        hashes[filled : filled + len(ids)] = [hash(v) for v in ids.to_pylist()]
        filled += len(ids)
    order = np.sort(hashes[:filled])
    if not (order[1:] == order[:-1]).any():
        return
    # A hash repeats: find the actual duplicate (hash collisions are possible, so confirm).
    suspects = set(order[1:][order[1:] == order[:-1]].tolist())
    seen: dict = {}
    for ids, file, _ in _iter_ids(spec, dataset):
        for value in ids.to_pylist():
            if hash(value) in suspects:
                if value in seen:
                    raise ValueError(
                        f"input.id_column {spec.id_column!r} is not unique: {value!r} appears in {seen[value]} "
                        f"and {file.url}"
                    )
                seen[value] = file.url


def _iter_ids(spec: InputSpec, dataset: Dataset):
    for file in dataset.files:
        with fsspec.open(file.url, "rb", **spec.storage_options) as f:
            pf = pq.ParquetFile(f)
            offset = 0  # of the row group in the file
            for group in range(pf.num_row_groups):
                ids = pf.read_row_group(group, columns=[spec.id_column]).column(0).combine_chunks()
                yield ids, file, offset
                offset += len(ids)
