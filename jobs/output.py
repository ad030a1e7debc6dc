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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec

from jobs.claim import OutputClaim, OutputConflict
from jobs.core import layout
from jobs.core.errors import BadInput, InputChanged, InputError, OutputError
from jobs.core.layout import CANCEL, RECORD, SHARD_FILES, OutputLayout
from jobs.core.plan import InputFile, Shard, shard_name
from jobs.core.protocol import CommitRecord, ShardResult
from jobs.core.spec import JobSpec, spec_from_dict
from jobs.core.storage import move, read_bytes, with_retries, write_bytes
from jobs.core.times import now
from jobs.dataset import pin_input
from jobs.record import JobRecord
from jobs.record_file import NoRecord, parse_record, read_record_doc
from jobs.snapshot import InputSnapshot, changes

log = logging.getLogger(__name__)


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

    def list(self, name: str = "") -> list[str]:
        """Names directly under `name` (the root by default); none if it does not exist."""
        def ls() -> list[str]:
            try:
                return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._path(name), detail=False)]
            except FileNotFoundError:
                return []

        return with_retries(ls, f"listing {self.url(name)}")

    def foreign_entries(self) -> list[str]:
        """What the output's root holds besides the claims, sorted: in a directory that has no job
        record, these were not made by a bulkgen job."""
        return sorted(n for n in self.list() if n != layout.CLAIMS and n)

    def read_record_doc(self) -> dict | None:
        """The job record as a dict, None if there is none; OutputError if it is not a job record."""
        return read_record_doc(self)

    def wipe(self) -> None:
        """Delete everything a job wrote (for --overwrite), and nothing else."""
        for name in layout.JOB_ENTRIES:
            self.remove(name)

    # -- shard commits ---------------------------------------------------------

    def commit(self, result: ShardResult, shard: Shard, attempts: int) -> CommitRecord:
        """Publish a shard attempt's staged files under their final names, then its commit record.
        `attempts`: the dispatches the shard took, this one included."""
        index, paths = shard.index, self.layout
        # Each step is retried on its own and is idempotent, so a transient
        # failure half-way never repeats a move that already happened.
        # A shard committed earlier (retry-failed rewrites one) is uncommitted
        # first, so no crash can leave a half-replaced set counted as done.
        self.remove(paths.commit(index))
        published: dict[str, str | None] = {}
        for kind in SHARD_FILES:  # errors, filtered, then data
            final = paths.shard_file(kind, index)
            if kind in result.staged:
                move(result.staged[kind], self.url(final), self.storage_options)
                published[kind] = final
            else:
                self.remove(final)  # left by an earlier, uncommitted attempt
                published[kind] = None
        record = CommitRecord(
            shard=index,
            name=shard_name(index),
            attempt=result.attempt,
            **published,
            tally=result.tally,
            input=shard.url,
            input_start=shard.start,
            input_stop=shard.stop,
            input_row_count=shard.num_rows if shard.rows is not None else None,
            input_rows_digest=shard.rows_digest,
            attempts=attempts,
            committed_at=now(),
            seconds=round(result.seconds, 3),
            replica_pid=result.replica.get("pid"),
        )
        self.write_json(paths.commit(index), record.to_json())
        self.remove(paths.staging(index))
        return record

    def commit_records(self) -> dict[int, CommitRecord]:
        """Every committed shard's record, by shard index."""

        def listing() -> list[str]:
            try:
                return [p for p in self.fs.ls(self._path(layout.COMMITS), detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return []

        paths = with_retries(listing, f"listing {self.url(layout.COMMITS)}")
        with ThreadPoolExecutor(max_workers=16) as pool:
            docs = pool.map(lambda p: json.loads(with_retries(lambda: self.fs.cat_file(p), f"reading {p}")), paths)
            records = [CommitRecord.from_json(doc) for doc in docs]
        return {record.shard: record for record in records}


def open_output(spec: JobSpec, overwrite: bool) -> tuple[OutputDir, OutputClaim, JobRecord]:
    """Claim the output for this driver and open this job's record in it (a new one for a new job).

    Refused (OutputConflict, InputChanged: exit 2) before anything is written: a directory
    bulkgen did not make, another driver's claim, another job's committed shards, or an input
    that changed since the job was planned. `overwrite` deletes what blocks the last two."""
    out = OutputDir(spec.output.uri, spec.output.storage_options)
    _refuse_foreign(out)
    claim = OutputClaim.acquire(out)
    try:
        return out, claim, _open_record(out, spec, overwrite)
    except BaseException:
        claim.release()
        raise


def check_output_takes(spec: JobSpec) -> None:
    """What `open_output` would refuse without --overwrite, found read-only (`bulkgen validate`)."""
    out = OutputDir(spec.output.uri, spec.output.storage_options)
    _refuse_foreign(out)
    blocker = _blocker(out, spec, out.read_record_doc())
    if blocker is not None:
        raise blocker


def _refuse_foreign(out: OutputDir) -> None:
    """A directory that is not empty and holds no job record is not bulkgen's: never written
    into, nor deleted, whatever the flags."""
    if out.read_record_doc() is None and out.foreign_entries():
        raise OutputConflict(
            f"{out.uri} is not empty ({', '.join(out.foreign_entries()[:5])}) and holds no bulkgen job record "
            f"({RECORD}); bulkgen neither writes into nor deletes a directory it did not make, --overwrite "
            "included: give another output.uri"
        )


def _blocker(out: OutputDir, spec: JobSpec, existing: dict | None) -> BadInput | None:
    """What keeps this spec from running in the output as it is (None: nothing): another job's
    committed shards, or an input that changed since the job was planned. --overwrite deletes either."""
    if existing is None:
        return None
    if not same_job(existing, spec):
        committed = out.commit_records()
        if not committed:
            return None
        return OutputConflict(
            f"{out.uri} holds {len(committed)} committed shards of a different job spec "
            f"(fingerprint {existing.get('fingerprint')}, this spec is {spec.fingerprint()}); "
            "use another output.uri, or --overwrite to delete them"
        )
    if existing.get("input"):
        changed = input_changes(spec, InputSnapshot.from_json(existing["input"]))
        if changed:
            return InputChanged(input_changed_message(out, changed))
    return None


def _open_record(out: OutputDir, spec: JobSpec, overwrite: bool) -> JobRecord:
    existing = out.read_record_doc()  # again: read under the claim
    blocker = _blocker(out, spec, existing)
    if blocker is not None and not overwrite:
        raise blocker
    if blocker is not None or (existing is not None and not same_job(existing, spec)):
        why = f"--overwrite: {str(blocker).splitlines()[0]}" if blocker else "another job's, which committed nothing"
        log.warning("deleting the output in %s (%s)", out.uri, why)
        out.wipe()
        existing = None
    if existing is None:
        record = JobRecord(spec.redacted(), spec.fingerprint(), spec.name)  # state pending
        out.write_json(RECORD, record.to_json())
    else:
        record = parse_record(existing, out.url(RECORD))
        record.fingerprint = spec.fingerprint()  # a record of an earlier release keeps its job, under today's hash
    out.remove(CANCEL)
    return record


def same_job(record_doc: dict, spec: JobSpec) -> bool:
    """Whether a record is of this spec's job: the same fingerprint, or (a record an earlier
    release wrote, under its own fingerprint formula) a recorded spec with today's fingerprint."""
    if record_doc.get("fingerprint") == spec.fingerprint():
        return True
    try:
        recorded = spec_from_dict(record_doc.get("spec") or {}, source=RECORD)
    except BadInput:
        return False
    return recorded.fingerprint() == spec.fingerprint()


def input_changes(spec: JobSpec, pinned: InputSnapshot, files: Sequence[InputFile] | None = None) -> list[str]:
    """How the input differs from the pinned snapshot, a line per file: by listing and stat, or
    with `files` (the footers validation read) those files, row counts included."""
    try:
        current = pin_input(spec.input, files)
    except InputError:  # no file left: every pinned file was removed
        current = []
    return changes(pinned.files, current)


def input_changed_message(out: OutputDir, changed: list[str]) -> str:
    lines = "\n  ".join(changed)
    return (
        f"the input changed since the job in {out.uri} was planned:\n  {lines}\n"
        "A job is its spec plus the input it was planned on, and its committed shards cover that input, so "
        "a changed input is never re-planned into it. Restore the input to resume; for a new night's input, "
        "write to a new output.uri (with cache.uri set, rows generated before are taken from the cache); "
        "or --overwrite to delete this output and start over on today's input."
    )


def check_commits_match_plan(out: OutputDir, commits: dict[int, CommitRecord], shards: list[Shard]) -> None:
    """Every committed shard must cover the rows the plan gives its index, or the job would
    count rows it never wrote and skip rows it never generated."""
    planned = {s.index: s for s in shards}
    wrong = []
    for index in sorted(commits):
        c, s = commits[index], planned.get(index)
        if s is None:
            wrong.append(f"{c.name} covers {c.describe_input()}; the plan has no such shard")
        elif not c.covers(s):
            wrong.append(f"{s.name} covers {c.describe_input()}; the plan's is {s.url} {s.describe_rows()}")
    if wrong:
        raise InputChanged(
            f"the committed shards in {out.uri} were cut from another input than this job's plan:\n  "
            + "\n  ".join(wrong)
            + "\nwrite to a new output.uri, or --overwrite to delete this output and start over"
        )


def read_record(output_uri: str, storage_options: dict | None = None) -> JobRecord:
    """The output's record; OutputError (exit 2) if it has none, or one that is no job record."""
    out = OutputDir(output_uri, storage_options or {})
    doc = read_record_doc(out)
    if doc is None:
        raise NoRecord(f"no job record ({RECORD}) under {output_uri}: not a bulkgen job output")
    return parse_record(doc, out.url(RECORD))
