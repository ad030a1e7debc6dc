"""Storage I/O shared by the driver and the replicas: retries, whole-file writes, Parquet.

A path is a full fsspec URL plus storage options. URL prefixes are never
compared by hand: the filesystem fsspec resolves decides, e.g. whether
renames are atomic, or whether the storage is process-local (memory://).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.memory import MemoryFileSystem

from jobs.core import faults

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that retrying cannot fix; everything else an OSError covers
# (timeouts, connection resets, 5xx from object stores) is worth a retry.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except _PERMANENT:
            raise
        except OSError as e:
            if attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(url: str, data: bytes, storage_options: dict) -> None:
    """Write a whole object. Object stores publish a PUT whole; local files go
    through a temporary name and a rename so a reader never sees half a file."""

    def write() -> None:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        faults.inject("storage.write", path=path)
        if _renames_atomically(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
            tmp = f"{path}.tmp-{random.getrandbits(48):012x}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, data)

    with_retries(write, f"writing {url}")


_memory_lock = threading.Lock()


def create_exclusive(url: str, data: bytes, storage_options: dict) -> bool:
    """Create a whole object only if nothing is at `url` yet; False if something is.

    Atomic where the store can do it: a hard link of a complete temporary file
    on local disks (link(2) fails if the name exists), a conditional PUT
    (If-None-Match: *) on S3, a lock around memory://'s one process. Any
    other store gets fsspec's check-then-write, which two writers can both
    pass: `atomic_create` says which a store gets."""

    def create() -> bool:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        faults.inject("storage.write", path=path)
        fs.makedirs(fs._parent(path), exist_ok=True)
        if _renames_atomically(fs):
            tmp = f"{path}.tmp-{random.getrandbits(48):012x}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            if isinstance(fs, MemoryFileSystem):
                with _memory_lock:
                    fs.pipe_file(path, data, mode="create")
            else:
                fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return with_retries(create, f"creating {url}")


def atomic_create(url: str, storage_options: dict) -> bool:
    """Whether create_exclusive is atomic on `url`'s store (see there)."""
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)
    return _renames_atomically(fs) or isinstance(fs, MemoryFileSystem) or "s3" in fs.protocol


def read_bytes(url: str, storage_options: dict) -> bytes:
    def read() -> bytes:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        return fs.cat_file(path)

    return with_retries(read, f"reading {url}")


def move(source_url: str, destination_url: str, storage_options: dict) -> None:
    """Publish `source_url` under `destination_url`, whole (a rename on local disk,
    one object on object stores). Idempotent: a move whose reply was lost is not redone."""
    fs, source = fsspec.core.url_to_fs(source_url, **storage_options)
    _, destination = fsspec.core.url_to_fs(destination_url, **storage_options)

    def mv() -> None:
        faults.inject("storage.move", path=destination)
        if not fs.exists(source) and fs.exists(destination):
            return  # moved by an earlier try whose reply was lost
        fs.makedirs(posixpath.dirname(destination), exist_ok=True)
        fs.mv(source, destination)

    with_retries(mv, f"publishing {source_url}")


def write_parquet(table: pa.Table, url: str, storage_options: dict) -> None:
    write_bytes(url, parquet_bytes(table), storage_options)


def open_parquet(source) -> pq.ParquetFile:
    """A Parquet file over a Python file object (fsspec's, BytesIO) that pyarrow reads on the
    calling thread only; give each of its reads `use_threads=False` as well.

    With pyarrow's defaults (pre_buffer, use_threads) its own I/O and CPU threads read the file,
    and the last of them to let go of it frees a Python object, which needs the GIL: when that
    happens as the interpreter exits, the process aborts. `bulkgen run` did, with SIGABRT, after
    printing its success (CI, 2026-12-06). bulkgen reads files in parallel with its own pools."""
    return pq.ParquetFile(source, pre_buffer=False)


def read_parquet(url: str, storage_options: dict, columns: list[str] | None = None) -> pa.Table:
    # ParquetFile reads one whole file without pyarrow's dataset scanner and its thread pool.
    return open_parquet(io.BytesIO(read_bytes(url, storage_options))).read(columns=columns, use_threads=False)


def read_row_range(url: str, storage_options: dict, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of one Parquet file, reading only the row groups that hold them."""

    def read() -> pa.Table:
        with fsspec.open(url, "rb", **storage_options) as f:
            pf = open_parquet(f)
            groups, first_row, offset = [], None, 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if offset < stop and offset + n > start:
                    groups.append(i)
                    first_row = offset if first_row is None else first_row
                offset += n
            if not groups:
                return pf.schema_arrow.empty_table().select(columns)
            table = pf.read_row_groups(groups, columns=columns, use_threads=False)
            return table.slice(start - first_row, stop - start)

    return with_retries(read, f"reading rows {start}:{stop} of {url}")


def read_rows(url: str, storage_options: dict, rows: Sequence[int], columns: list[str]) -> pa.Table:
    """The rows at these indices (ascending) of one Parquet file, reading only the row groups that hold them."""

    def read() -> pa.Table:
        with fsspec.open(url, "rb", **storage_options) as f:
            pf = open_parquet(f)
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            starts = list(itertools.accumulate(sizes, initial=0))  # starts[g]: group g's first row in the file
            group_of = [bisect.bisect_right(starts, row) - 1 for row in rows]
            groups = sorted(set(group_of))
            # Where each chosen group's rows begin in the table of the chosen groups.
            begins = dict(zip(groups, itertools.accumulate((sizes[g] for g in groups), initial=0)))
            table = pf.read_row_groups(groups, columns=columns, use_threads=False)
            at = [begins[g] + row - starts[g] for row, g in zip(rows, group_of)]
            return table.take(pa.array(at, pa.int64()))

    return with_retries(read, f"reading {len(rows)} listed rows of {url}")


@contextlib.contextmanager
def reaching(field: str, uri: str, error: type[Exception]):
    """Turn a failure to reach `uri` into `error` naming the spec field, instead of a
    library's traceback. Wrap only calls that touch the storage: whatever they raise
    (no credentials, unknown protocol, no such bucket, no network; botocore's errors
    share no base class with OSError) means the storage cannot be used as given."""
    try:
        yield
    except error:
        raise
    except Exception as e:
        raise error(
            f"{field} {uri!r} cannot be reached with the given storage_options and environment: "
            f"{type(e).__name__}: {e}"
        ) from e


def process_local(url: str, storage_options: dict) -> bool:
    """Whether `url` lives in this process only (memory://), so other
    processes (Ray workers) cannot reach it and rows must travel through Ray."""
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)
    return isinstance(fs, MemoryFileSystem)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _renames_atomically(fs: fsspec.AbstractFileSystem) -> bool:
    # Local disks rename in one step; object stores implement mv as copy+delete,
    # but publish each object whole, so a direct write is already all-or-nothing.
    return "file" in fs.protocol or "local" in fs.protocol
