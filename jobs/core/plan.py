"""Shard planning: pure functions over Parquet footer facts.

Imports neither Ray nor torch nor any storage library, so it is tested on
made-up inputs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class InputFile:
    """What the footer says about one input file."""

    url: str  # full fsspec URL, e.g. s3://bucket/prompts/part-0.parquet
    relpath: str  # relative to the input root; part of derived row ids
    num_rows: int


@dataclass(frozen=True)
class Shard:
    """A row range of one input file; one output file per shard."""

    index: int
    url: str
    relpath: str
    start: int  # first row, inclusive
    stop: int  # last row, exclusive
    # Rows whose prompts share a prefix (jobs/core/prefix.py) carry its key, so
    # that the scheduler keeps them on one replica; None when ungrouped.
    group: int | None = None

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


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
