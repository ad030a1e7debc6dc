"""The job's output directory and its commit protocol (paths: jobs/core/layout.py).

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

from jobs.core import layout
from jobs.core.errors import OutputError
from jobs.core.layout import CANCEL, RECORD, OutputLayout
from jobs.core.plan import shard_name
from jobs.core.protocol import ShardResult
from jobs.core.spec import JobSpec
from jobs.core.storage import move, read_bytes, with_retries, write_bytes
from jobs.record import JobRecord, JobState, driver_alive

log = logging.getLogger(__name__)


class OutputConflict(OutputError):
    """The output holds another job's committed results, or a live driver writes it."""


class OutputDir:
    def __init__(self, uri: str, storage_options: dict):
        self.layout = OutputLayout(uri)
        self.uri = self.layout.uri
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options)

    def url(self, relpath: str) -> str:
        return self.layout.url(relpath)

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
        for name in layout.JOB_ENTRIES:
            self.remove(name)

    # -- shard commits ---------------------------------------------------------

    def commit(self, result: ShardResult, extra: dict) -> dict:
        """Publish a shard attempt's staged files under their final names, then its commit record."""
        shard, paths = result.shard, self.layout
        # Each step is retried on its own and is idempotent, so a transient
        # failure half-way never repeats a move that already happened.
        # A shard committed earlier (retry-failed rewrites one) is uncommitted
        # first, so no crash can leave a half-replaced pair counted as done.
        self.remove(paths.commit(shard))
        if result.errors_url:
            move(result.errors_url, self.url(paths.errors(shard)), self.storage_options)
        else:
            self.remove(paths.errors(shard))  # left by an earlier, uncommitted attempt
        if result.filtered_url:
            move(result.filtered_url, self.url(paths.filtered(shard)), self.storage_options)
        else:
            self.remove(paths.filtered(shard))
        move(result.data_url, self.url(paths.data(shard)), self.storage_options)
        record = {
            "shard": shard,
            "name": shard_name(shard),
            "attempt": result.attempt,
            "data": paths.data(shard),
            "errors": paths.errors(shard) if result.errors_url else None,
            "rows_done": result.samples_ok,
            "rows_failed": result.samples_failed,
            "rows_cached": result.samples_cached,
            "rows_filtered": result.samples_filtered,
            "filtered": paths.filtered(shard) if result.filtered_url else None,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            **extra,
        }
        self.write_json(paths.commit(shard), record)
        self.remove(paths.staging(shard))
        return record

    def commit_records(self) -> dict[int, dict]:
        """Every committed shard's record, by shard index."""

        def listing() -> list[str]:
            try:
                return [p for p in self.fs.ls(self._path(layout.COMMITS), detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return []

        paths = with_retries(listing, f"listing {self.url(layout.COMMITS)}")
        with ThreadPoolExecutor(max_workers=16) as pool:
            docs = pool.map(lambda p: json.loads(with_retries(lambda: self.fs.cat_file(p), f"reading {p}")), paths)
            return {doc["shard"]: doc for doc in docs}


def claim_output(spec: JobSpec, overwrite: bool) -> tuple[OutputDir, JobRecord]:
    """Open the output for this spec: resume its own record, or refuse another job's results."""
    out = OutputDir(spec.output.uri, spec.output.storage_options)
    existing = out.read_json(RECORD)
    if existing and existing.get("state") == JobState.RUNNING.value and driver_alive(existing):
        run = existing["runs"][-1]
        raise OutputConflict(
            f"{out.uri} is being written by a running driver (pid {run.get('pid')} on {run.get('host')}, "
            f"record updated {existing.get('updated_at')}); `bulkgen cancel` it or wait for it"
        )
    if existing and existing.get("fingerprint") != spec.fingerprint():
        committed = out.commit_records()
        if overwrite:
            log.warning("--overwrite: deleting the previous job's output in %s", out.uri)
            out.wipe()
        elif committed:
            raise OutputConflict(
                f"{out.uri} holds {len(committed)} committed shards of a different job spec "
                f"(fingerprint {existing.get('fingerprint')}, this spec is {spec.fingerprint()}); "
                "use another output.uri, or --overwrite to delete them"
            )
        else:
            out.wipe()  # nothing committed to lose (e.g. an earlier spec failed validation)
        existing = None
    elif not existing and not out.is_empty() and not overwrite:
        raise OutputConflict(f"{out.uri} is not empty and was not written by bulkgen; use another output.uri")
    if existing:
        record = JobRecord.from_json(existing)
    else:
        record = JobRecord(spec.redacted(), spec.fingerprint(), spec.name)  # state pending
        out.write_json(RECORD, record.to_json())  # claims the output for this spec
    out.remove(CANCEL)
    return out, record


def read_record(output_uri: str, storage_options: dict | None = None) -> JobRecord:
    """The output's record; OutputError (exit 2) if it has none, or one that is no job record."""
    from jobs.record_file import NoRecord, parse_record, read_record_doc

    out = OutputDir(output_uri, storage_options or {})
    doc = read_record_doc(out)
    if doc is None:
        raise NoRecord(f"no job record ({RECORD}) under {output_uri}: not a bulkgen job output")
    return parse_record(doc, out.url(RECORD))
