"""The job record, _job.json: what `bulkgen status` reports, true while a job runs.

States: pending -> validating -> running -> finalizing -> succeeded | failed | cancelled.
Counts are in output rows, one per (id, sample_index).
"""

from __future__ import annotations

import getpass
import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

STATES = ("pending", "validating", "running", "finalizing", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("bulkgen", "torch", "transformers", "ray", "pyarrow", "fsspec"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@dataclass
class Counts:
    input_rows: int = 0
    rows_total: int = 0  # input_rows * num_return_sequences
    rows_done: int = 0  # in data/
    rows_failed: int = 0  # in errors/
    shards_total: int = 0
    shards_committed: int = 0
    shards_retried: int = 0  # attempts that had to be redone
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class JobRecord:
    spec: dict  # redacted: storage option values hidden
    fingerprint: str
    name: str | None = None
    state: str = "pending"
    counts: Counts = field(default_factory=Counts)
    model: dict = field(default_factory=dict)
    versions: dict = field(default_factory=library_versions)
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    started_at: str | None = None
    finished_at: str | None = None
    runs: list[dict] = field(default_factory=list)  # one entry per driver run (resumes)
    error: dict | None = None  # {"message", "where", "shard"?} when failed

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> JobRecord:
        doc = dict(doc)
        doc["counts"] = Counts(**doc.get("counts", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})

    def set_state(self, state: str, error: dict | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {STATES}")
        self.state = state
        self.updated_at = now()
        if state == "running" and self.started_at is None:
            self.started_at = self.updated_at
        if state in FINAL_STATES:
            self.finished_at = self.updated_at
        if error is not None:
            self.error = error

    def start_run(self, address: str | None) -> None:
        self.runs.append(
            {
                "started_at": now(),
                "host": socket.gethostname(),
                "user": _user(),
                "pid": os.getpid(),
                "ray_address": address or "local",
            }
        )
        self.error = None
        self.finished_at = None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def format_status(record: JobRecord, uri: str) -> str:
    """Human-readable summary for `bulkgen status`."""
    c = record.counts
    pct = 100.0 * (c.rows_done + c.rows_failed) / c.rows_total if c.rows_total else 0.0
    lines = [
        f"job:      {record.name or '(unnamed)'}  [{record.fingerprint}]",
        f"output:   {uri}",
        f"state:    {record.state}",
        f"rows:     {c.rows_done + c.rows_failed}/{c.rows_total} ({pct:.1f}%)  done {c.rows_done}  failed {c.rows_failed}",
        f"shards:   {c.shards_committed}/{c.shards_total} committed  ({c.shards_retried} retried)",
        f"tokens:   {c.prompt_tokens} prompt, {c.completion_tokens} generated",
        f"updated:  {record.updated_at}",
    ]
    if record.error:
        where = record.error.get("where", "")
        lines.append(f"error:    {record.error.get('message')}" + (f"  (in {where})" if where else ""))
    return "\n".join(lines)

