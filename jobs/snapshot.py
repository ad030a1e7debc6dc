"""The input a job was planned on: every file pinned, which the plan is rebuilt from.

A job is its spec plus this snapshot. The first run records it in _job.json;
every later run (resume, re-run, retry-failed) plans from the recorded one and
refuses an input that differs from it, so shard N always means the same rows
and no row is lost or written twice when files are added, removed or
rewritten between runs (a grown input under `rows_per_shard: auto` would even
re-cut every shard).

A file is known by its size and its store's version stamp: the ETag or
generation object stores give every write, else the modification time local
disks keep. Comparing them costs one listing and no read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from jobs.core.plan import InputFile
from jobs.core.storage import with_retries

# The keys fsspec implementations use for a version stamp, most specific first:
# GCS generation, S3 VersionId (versioned buckets) and ETag, Azure etag,
# then a modification time (local files: mtime; memory://: created).
_STAMP_KEYS = ("generation", "VersionId", "ETag", "etag", "mtime", "LastModified", "last_modified", "created")


@dataclass(frozen=True)
class PinnedFile:
    relpath: str  # relative to the input root: what the plan sorts by and row ids derive from
    url: str
    size: int | None
    version: str | None  # the store's stamp for this write of the file (see _STAMP_KEYS)
    num_rows: int | None = None  # rows (Parquet footer, or batch lines); None where only listed

    def describe(self) -> str:
        rows = f", {self.num_rows} rows" if self.num_rows is not None else ""
        return f"size {self.size}, version {self.version}{rows}"


@dataclass(frozen=True)
class InputSnapshot:
    rows_per_shard: int  # shards.rows_per_shard as resolved when planned (`auto` decided once)
    files: tuple[PinnedFile, ...]
    # shards.group_by_prefix: on: jobs/core/plan.py's plan_digest of the grouped plan the first
    # run computed from these files. Every later run computes it again from the same (pinned)
    # rows and must get this digest, or it refuses to run (InputChanged).
    plan_digest: str | None = None

    def input_files(self) -> list[InputFile]:
        return [InputFile(f.url, f.relpath, f.num_rows or 0) for f in self.files]

    def to_json(self) -> dict:
        doc = {"rows_per_shard": self.rows_per_shard, "files": [asdict(f) for f in self.files]}
        return {**doc, "plan_digest": self.plan_digest} if self.plan_digest is not None else doc

    @classmethod
    def from_json(cls, doc: dict) -> InputSnapshot:
        return cls(int(doc["rows_per_shard"]), tuple(PinnedFile(**f) for f in doc["files"]), doc.get("plan_digest"))


def changes(pinned: Sequence[PinnedFile], current: Sequence[PinnedFile]) -> list[str]:
    """What differs between the pinned input and the current one, a line per file
    (empty when they are the same). Row counts are compared where both sides know them."""
    before, after = {f.relpath: f for f in pinned}, {f.relpath: f for f in current}
    lines = [f"added:     {after[p].url}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed:   {before[p].url}" for p in sorted(before.keys() - after.keys())]
    for path in sorted(before.keys() & after.keys()):
        old, new = before[path], after[path]
        rows_differ = None not in (old.num_rows, new.num_rows) and old.num_rows != new.num_rows
        if (old.size, old.version) != (new.size, new.version) or rows_differ:
            lines.append(f"rewritten: {new.url} (was {old.describe()}; now {new.describe()})")
    return lines


def version_stamp(info: dict) -> str | None:
    for key in _STAMP_KEYS:
        value = info.get(key)
        if value is not None:
            return f"{key}:{value}"
    return None


def pin_files(fs, files: Iterable[tuple[str, str, int | None]]) -> list[PinnedFile]:
    """Stat every (url, relpath, rows or None) file (in parallel: on object storage each is a
    round trip)."""

    def pin(file: tuple[str, str, int | None]) -> PinnedFile:
        url, relpath, num_rows = file
        info = with_retries(lambda: fs.info(url), f"checking {url}")
        return PinnedFile(relpath, url, info.get("size"), version_stamp(info), num_rows)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sorted(pool.map(pin, list(files)), key=lambda f: f.relpath)
