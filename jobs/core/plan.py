"""Shard planning: pure functions over Parquet footer facts (and, for a plan grouped by
prompt prefix, each row's prefix key, which the driver reads for it).

Imports neither Ray nor torch nor any storage library, so it is tested on
made-up inputs in milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InputFile:
    """What the footer says about one input file."""

    url: str  # full fsspec URL, e.g. s3://bucket/prompts/part-0.parquet
    relpath: str  # relative to the input root; part of derived row ids
    num_rows: int


@dataclass(frozen=True)
class Shard:
    """Rows of one input file, a range or (grouped by prefix) listed; one output file per shard.

    A row's index is its index in its file, whatever shard holds it, so ids and seeds
    never depend on the plan."""

    index: int
    url: str
    relpath: str
    start: int  # first row, inclusive
    stop: int  # last row, exclusive
    # Rows whose prompts share a prefix (jobs/core/prefix.py) carry its key, so
    # that the scheduler keeps them on one replica; None when ungrouped.
    group: int | None = None
    # The rows, ascending, when they are not the whole range [start, stop) (a grouped
    # plan's shard picks its key's rows from the file); start and stop then bound them.
    rows: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def num_rows(self) -> int:
        return len(self.rows) if self.rows is not None else self.stop - self.start

    def row_indices(self) -> Sequence[int]:
        """Its rows' indices in the file, ascending: the order they are read and written in."""
        return self.rows if self.rows is not None else range(self.start, self.stop)

    @property
    def rows_digest(self) -> str | None:
        """A listed shard's rows as a short hash, for its commit record (None for a range)."""
        return None if self.rows is None else rows_digest(self.rows)

    def describe_rows(self) -> str:
        return describe_rows(self.start, self.stop, None if self.rows is None else len(self.rows))


def describe_rows(start: int | None, stop: int | None, listed: int | None) -> str:
    """A shard's rows, for a message: "rows 0:1000", or "12 rows within 0:1000" when it lists them."""
    span = f"{start}:{stop}"
    return f"rows {span}" if listed is None else f"{listed} rows within {span}"


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


AUTO_ROWS_PER_SHARD = 1000
AUTO_MIN_SHARDS, AUTO_MIN_ROWS = 16, 16  # a small input still gives every replica shards


def rows_per_shard(setting: int | str, input_rows: int) -> int:
    """shards.rows_per_shard, with `auto` decided by the input's row count alone
    (never by the cluster: a resume on another cluster must plan the same shards)."""
    if setting != "auto":
        return int(setting)
    return max(AUTO_MIN_ROWS, min(AUTO_ROWS_PER_SHARD, -(-input_rows // AUTO_MIN_SHARDS)))


def rows_digest(rows: Sequence[int]) -> str:
    return hashlib.blake2b(",".join(map(str, rows)).encode(), digest_size=8).hexdigest()


def plan(files: Iterable[InputFile], rows_per_shard: int) -> list[Shard]:
    """Cut files into shards of at most `rows_per_shard` rows.

    Files are taken in relpath order and shards never span files, so the same
    input and rows_per_shard always give the same shards with the same
    indices (and so the same output file names)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    shards: list[Shard] = []
    for f in sorted(files, key=lambda f: f.relpath):
        for start in range(0, f.num_rows, rows_per_shard):
            stop = min(start + rows_per_shard, f.num_rows)
            shards.append(Shard(len(shards), f.url, f.relpath, start, stop))
    return shards


# A key shared by fewer rows does not get shards of its own: each would be a small shard
# (a commit, an output file, a dispatch) to save one short prefill, and a dataset whose
# prompts are all different would be cut into a shard per row.
MIN_GROUP_ROWS = 8


def plan_grouped(
    files: Iterable[InputFile], keys_of: Callable[[InputFile], Sequence[int | None]], rows_per_shard: int
) -> list[Shard]:
    """Cut files into shards of at most `rows_per_shard` rows, a prefix key's rows together.

    `keys_of(file)` gives each row's prefix key (None: no prefix worth sharing), one file at
    a time. Per file (in relpath order, as plan()), rows are ordered by (key, row index) and
    each key shared by MIN_GROUP_ROWS rows or more is cut into shards of its own, as equal
    as they can be, carrying the key as `group`; then the other rows, in file order, as
    plan() would cut them. A shard never spans files or keys. Shards whose rows happen to
    be contiguous are plain ranges; the others list their rows. The same input and keys
    give the same shards, with the same indices."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    shards: list[Shard] = []
    for f in sorted(files, key=lambda f: f.relpath):
        keys = keys_of(f)
        if len(keys) != f.num_rows:
            raise ValueError(f"{len(keys)} prefix keys for the {f.num_rows} rows of {f.url}")
        by_key: dict[int, list[int]] = {}
        for row, key in enumerate(keys):
            if key is not None:
                by_key.setdefault(key, []).append(row)
        groups = sorted((key, rows) for key, rows in by_key.items() if len(rows) >= MIN_GROUP_ROWS)
        for key, rows in groups:
            parts, n = -(-len(rows) // rows_per_shard), len(rows)
            for k in range(parts):  # rows [k*n//parts, (k+1)*n//parts): sizes differ by one at most
                shards.append(_shard(len(shards), f, rows[k * n // parts : (k + 1) * n // parts], key))
        rest = [row for row, key in enumerate(keys) if key is None or len(by_key[key]) < MIN_GROUP_ROWS]
        for start in range(0, len(rest), rows_per_shard):
            shards.append(_shard(len(shards), f, rest[start : start + rows_per_shard], None))
    return shards


def _shard(index: int, f: InputFile, rows: list[int], group: int | None) -> Shard:
    start, stop = rows[0], rows[-1] + 1
    listed = None if stop - start == len(rows) else tuple(rows)
    return Shard(index, f.url, f.relpath, start, stop, group, listed)


def plan_digest(shards: Iterable[Shard]) -> str:
    """Every shard's file, rows and group as one hash: a resume that recomputes a grouped plan
    checks it against the one its first run pinned."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.index}|{s.relpath}|{s.start}|{s.stop}|{s.group}|{s.rows_digest}\n".encode())
    return h.hexdigest()[:16]
