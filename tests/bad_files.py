"""Parquet input that pyarrow writes and reads without complaint but that bulkgen cannot use as given."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def not_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding the bytes as written (pyarrow checks no UTF-8 on write or read)."""
    return pa.array(values, pa.binary()).view(pa.string())


def corrupt_column(path, column: str) -> None:
    """Overwrite the start of a column's first page (its header): the footer stays readable."""
    meta = pq.read_metadata(path).row_group(0)
    chunk = meta.column(pq.read_schema(path).get_field_index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(Path(path).read_bytes())
    data[start : start + 16] = b"\xff" * 16
    Path(path).write_bytes(bytes(data))
