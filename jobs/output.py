"""The job's output directory and its commit protocol.

    _job.json                  job record (jobs/record.py)
    data/part-NNNNN.parquet    generated rows of shard NNNNN
    errors/part-NNNNN.parquet  its dead letters, when it has any
    _commits/part-NNNNN.json   the shard's commit record, written last
    _manifest.json             all commit records, written at the end
    _SUCCESS                   written last, only when the job succeeded
    _staging/                  attempts' files before commit; removed at the end

Only the driver commits. Replicas write to their own attempt directory under
_staging/, so a zombie attempt can never touch data/ or errors/. A commit
moves the staged files to their deterministic names (each move publishes a
whole file: a rename on local disk, a single object on object stores) and then
writes the commit record. A shard is committed if and only if its commit
record exists; a crash before that leaves the shard uncommitted, and redoing
it replaces both files, so every (id, sample_index) lands exactly once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor

import fsspec

from jobs.plan import shard_name
from workers.replica import ShardResult
from workers.storage import read_bytes, with_retries, write_bytes

log = logging.getLogger(__name__)


class OutputDir:
    def __init__(self, uri: str, storage_options: dict):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options)

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # -- small JSON documents -------------------------------------------------

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(read_bytes(self.url(name), self.storage_options))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, doc: dict) -> None:
        write_bytes(self.url(name), json.dumps(doc, indent=2, sort_keys=True).encode(), self.storage_options)

    def exists(self, name: str) -> bool:
        return with_retries(lambda: self.fs.exists(self._path(name)), f"checking {self.url(name)}")

    def remove(self, name: str) -> None:
        def rm() -> None:
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name), recursive=True)

        with_retries(rm, f"removing {self.url(name)}")

    def is_empty(self) -> bool:
        try:
            return not self.fs.ls(self.root)
        except FileNotFoundError:
            return True

    def wipe(self) -> None:
        """Delete everything this job wrote (for --overwrite)."""
        for name in ("_SUCCESS", "_manifest.json", "_commits", "data", "errors", "_staging", "_job.json"):
            self.remove(name)

    # -- shard commits ---------------------------------------------------------

    def commit(self, result: ShardResult, extra: dict) -> dict:
        """Publish a shard attempt's staged files under their final names, then its commit record."""
        name = shard_name(result.shard)
        record_name = f"_commits/{name}.json"
        data_path, errors_path = self._path("data", f"{name}.parquet"), self._path("errors", f"{name}.parquet")

        # Each step is retried on its own and is idempotent, so a transient
        # failure half-way never repeats a move that already happened.
        # A shard committed earlier (retry-failed rewrites one) is uncommitted
        # first, so no crash can leave a half-replaced pair counted as done.
        self.remove(record_name)
        if result.errors_url:
            self._move(result.errors_url, errors_path)
        else:
            self.remove(f"errors/{name}.parquet")  # left by an earlier, uncommitted attempt
        self._move(result.data_url, data_path)
        record = {
            "shard": result.shard,
            "name": name,
            "attempt": result.attempt,
            "data": f"data/{name}.parquet",
            "errors": f"errors/{name}.parquet" if result.errors_url else None,
            "rows_done": result.samples_ok,
            "rows_failed": result.samples_failed,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            **extra,
        }
        self.write_json(record_name, record)
        self.remove(f"_staging/{name}")
        return record

    def _move(self, staged_url: str, final_path: str) -> None:
        """Publish one staged file under its final name (a whole file, never a partial one)."""
        _, staged = fsspec.core.url_to_fs(staged_url, **self.storage_options)

        def move() -> None:
            if not self.fs.exists(staged) and self.fs.exists(final_path):
                return  # moved by an earlier try whose reply was lost
            self.fs.makedirs(posixpath.dirname(final_path), exist_ok=True)
            self.fs.mv(staged, final_path)

        with_retries(move, f"publishing {staged_url}")

    def commit_records(self) -> dict[int, dict]:
        """Every committed shard's record, by shard index."""

        def listing() -> list[str]:
            try:
                return [p for p in self.fs.ls(self._path("_commits"), detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return []

        paths = with_retries(listing, f"listing {self.url('_commits')}")
        with ThreadPoolExecutor(max_workers=16) as pool:
            docs = pool.map(lambda p: json.loads(with_retries(lambda: self.fs.cat_file(p), f"reading {p}")), paths)
            return {doc["shard"]: doc for doc in docs}
