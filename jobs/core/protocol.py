"""What the driver sends a replica for one shard attempt, and what comes back.

Small on purpose: a task names its row range, never carries rows (except
for process-local input, below); a result carries counts and where the
files are staged, never the rows themselves. The driver turns a result into
the shard's commit record, also typed here: every reader of one reads this type.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from jobs.core.plan import Shard, describe_rows, shard_name


class TaskKind(str, Enum):
    PROCESS = "process"  # generate every row of the shard
    RETRY_FAILED = "retry_failed"  # generate a committed shard's dead letters again


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    attempt: str  # unique per dispatch: names the attempt's staging directory
    kind: TaskKind = TaskKind.PROCESS
    # Set only when the input is process-local (memory://): the driver read
    # the rows, since the replica's process cannot reach that storage.
    rows: Any = None  # pyarrow.Table


@dataclass(frozen=True)
class Tally:
    """A shard attempt's counts, in output rows (one per id and sample_index) and tokens.

    The replica's stages add to it; the commit record stores it under these names, and
    jobs/record.py's committed_counts sums every field into the job record's Counts: a new
    counter is a field here and one of that name in Counts (a test checks), no more code."""

    rows_done: int = 0  # in data/
    rows_failed: int = 0  # in errors/
    rows_cached: int = 0  # of rows_done, taken from the row cache instead of generated
    rows_filtered: int = 0  # in filtered/: generated, then dropped by a quality filter
    prompt_tokens: int = 0  # of the rows in data/
    completion_tokens: int = 0  # of the rows in data/
    reasoning_tokens: int = 0  # of completion_tokens, those up to and including the end tag (generation.reasoning)

    def __add__(self, other: Tally) -> Tally:
        return Tally(**{name: getattr(self, name) + getattr(other, name) for name in TALLY_FIELDS})

    def __sub__(self, other: Tally) -> Tally:
        return Tally(**{name: getattr(self, name) - getattr(other, name) for name in TALLY_FIELDS})

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in TALLY_FIELDS}

    @classmethod
    def from_json(cls, doc: dict) -> Tally:
        """The tally within a commit record (flat); a counter an earlier release did not write is 0."""
        return cls(**{name: doc.get(name, 0) for name in TALLY_FIELDS})


TALLY_FIELDS = tuple(f.name for f in fields(Tally))
# Counters of a feature a job may leave off: a commit record holds one only when it counted
# something, so a job without the feature writes the records it always wrote (read back as 0).
FEATURE_COUNTERS = frozenset({"reasoning_tokens"})


@dataclass(frozen=True)
class ShardProgress:
    """A replica's word that a shard attempt's rows have left its engine (they are being
    parsed and written now): the driver may send the next shard. It commits nothing."""

    shard: int
    attempt: str
    sequences_left: int  # sequences the replica's engine still holds, of every shard it runs


@dataclass(frozen=True)
class ShardResult:
    """A replica's report on one shard attempt: its tally and where its files are staged."""

    shard: int
    attempt: str
    tally: Tally
    seconds: float
    # File kind (jobs/core/layout.py's SHARD_FILES: "data", "errors", "filtered") -> the URL
    # it is staged at; "data" is always there, the others only when the attempt has such rows.
    staged: dict[str, str]
    # The replica's engine counters (cumulative over the replica's life) and
    # its pid: the driver keeps the latest per replica in the job record.
    replica: dict = field(default_factory=dict)
    # Set only when the output is process-local (memory://): the staged files'
    # bytes, for the driver to write, since the replica cannot reach its storage.
    inline_files: dict[str, bytes] | None = None


@dataclass(frozen=True)
class CommitRecord:
    """A shard's commit record (jobs/core/layout.py): the shard is committed iff it exists (jobs/output.py).

    On disk it is flat, the tally's counters beside the other keys, as every release wrote
    it; a record of an earlier release lacks the later keys, read as 0 or None."""

    shard: int
    name: str  # part-NNNNN
    attempt: str | None  # the attempt whose files were published
    # Its files, relative to the output root (jobs/core/layout.py); errors and filtered
    # are None when the attempt had no such rows.
    data: str
    errors: str | None
    filtered: str | None
    tally: Tally
    input: str | None = None  # the input file and row range the shard covers
    input_start: int | None = None
    input_stop: int | None = None
    attempts: int | None = None  # dispatches it took
    # For the report's throughput over time and per replica.
    committed_at: str | None = None
    seconds: float | None = None  # the attempt's time on its replica
    replica_pid: int | None = None
    # A shard of a grouped plan (shards.group_by_prefix) covers some rows of [input_start,
    # input_stop): how many, and which (jobs/core/plan.py rows_digest); None for a whole range.
    input_row_count: int | None = None
    input_rows_digest: str | None = None

    @property
    def input_rows(self) -> int:
        """The input rows the shard covers (0 when its record does not say)."""
        if self.input_row_count is not None:
            return self.input_row_count
        if self.input_start is None or self.input_stop is None:
            return 0
        return self.input_stop - self.input_start

    def covers(self, shard: Shard) -> bool:
        """Whether the record covers exactly the rows the plan gives `shard`."""
        return (self.input, self.input_start, self.input_stop, self.input_rows_digest) == (
            shard.url, shard.start, shard.stop, shard.rows_digest
        )  # fmt: skip

    def describe_input(self) -> str:
        return f"{self.input} {describe_rows(self.input_start, self.input_stop, self.input_row_count)}"

    def to_json(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tally"}
        for name in LISTED_ROWS_KEYS:  # only a grouped shard's record has them: the others stay as they were
            if doc[name] is None:
                del doc[name]
        tally = {k: v for k, v in self.tally.to_json().items() if v or k not in FEATURE_COUNTERS}
        return {**doc, **tally}

    @classmethod
    def from_json(cls, doc: dict) -> CommitRecord:
        shard = doc["shard"]
        known = {f.name for f in fields(cls)} - {"shard", "name", "tally"}
        return cls(
            shard=shard,
            name=doc.get("name") or shard_name(shard),
            tally=Tally.from_json(doc),
            **{name: doc.get(name) for name in known},
        )


LISTED_ROWS_KEYS = ("input_row_count", "input_rows_digest")


def row_seed(job_seed: int, row_id, sample_index: int) -> int:
    """A sequence's sampling seed: a function of the job seed, row id and sample index only."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in int64
