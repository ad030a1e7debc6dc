"""A shard's files as the replica writes them: output rows gathered column-wise, then staged.

A replica writes only under its attempt's staging directory; the driver
publishes (jobs/output.py). For process-local output (memory://) the staged
bytes go back to the driver instead, which is the one process that can reach
that storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from jobs.core import storage
from jobs.core.layout import OutputLayout
from jobs.core.rows import data_fields, error_fields, filtered_fields
from jobs.core.spec import JobSpec


class OutputRows:
    """Column-wise accumulator for output (or dead-letter) rows; input columns come from `row`."""

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.count = 0
        self._rows: list[dict] = []

    def add(self, *, id, row: dict, **values) -> None:
        self._rows.append(row)
        self.columns.setdefault("id", []).append(id)
        for k, v in values.items():
            self.columns.setdefault(k, []).append(v)
        self.count += 1

    def to_table(self, fields: list[pa.Field], metadata: dict[bytes, bytes]) -> pa.Table:
        arrays = []
        for i, f in enumerate(fields):
            if i == 0:  # the id column, whatever its name
                values = self.columns.get("id", [])
            elif f.name in self.columns:
                values = self.columns[f.name]
            else:  # an input column carried through
                values = [r[f.name] for r in self._rows]
            arrays.append(pa.array(values, type=f.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))


@dataclass(frozen=True)
class Staged:
    urls: dict[str, str]  # file kind (jobs/core/layout.py's SHARD_FILES) -> staged URL
    inline: dict[str, bytes] | None  # bytes by URL, for the driver to write (process-local output)


def stage(spec: JobSpec, shard: int, attempt: str, tables: dict[str, pa.Table]) -> Staged:
    """Write an attempt's files (`tables`: by file kind) under _staging/. Their bytes are
    returned instead of written when the output is process-local."""
    layout = OutputLayout(spec.output.uri)
    urls = {kind: layout.url(layout.staged_file(kind, shard, attempt)) for kind in tables}
    staged = {urls[kind]: storage.parquet_bytes(table) for kind, table in tables.items()}
    if storage.process_local(spec.output.uri, spec.output.storage_options):
        return Staged(urls, staged)
    for url, payload in staged.items():
        storage.write_bytes(url, payload, spec.output.storage_options)
    return Staged(urls, None)


def data_table(spec: JobSpec, rows: OutputRows, input_schema: pa.Schema, metadata: dict[bytes, bytes]) -> pa.Table:
    return rows.to_table(data_fields(spec, input_schema), metadata)


def filtered_table(spec: JobSpec, rows: OutputRows, input_schema: pa.Schema, metadata: dict[bytes, bytes]) -> pa.Table:
    return rows.to_table(filtered_fields(spec, input_schema), metadata)


def errors_table(spec: JobSpec, rows: OutputRows, input_schema: pa.Schema, metadata: dict[bytes, bytes]) -> pa.Table:
    return rows.to_table(error_fields(spec, input_schema), metadata)


def read_committed(spec: JobSpec, shard: int) -> tuple[pa.Table, pa.Table]:
    """A committed shard's data and errors files (for retry-failed)."""
    layout, opts = OutputLayout(spec.output.uri), spec.output.storage_options
    data = storage.read_parquet(layout.url(layout.data(shard)), opts)
    errors = storage.read_parquet(layout.url(layout.errors(shard)), opts)
    return data, errors
