"""What the driver sends a replica for one shard attempt, and what comes back.

Small on purpose: a task names its row range, never carries rows (except
for process-local input, below); a result carries counts and where the
files are staged, never the rows themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from jobs.core.plan import Shard


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
class ShardResult:
    """A replica's report on one shard attempt: counts and where the files are staged."""

    shard: int
    attempt: str
    samples_ok: int
    samples_failed: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    data_url: str
    errors_url: str | None
    samples_cached: int = 0  # of samples_ok, taken from the row cache instead of generated
    samples_filtered: int = 0  # generated, then dropped by a quality filter (filters:)
    filtered_url: str | None = None
    # The replica's engine counters (cumulative over the replica's life) and
    # its pid: the driver keeps the latest per replica in the job record.
    replica: dict = field(default_factory=dict)
    # Set only when the output is process-local (memory://): the staged files'
    # bytes, for the driver to write, since the replica cannot reach its storage.
    inline_files: dict[str, bytes] | None = None


def row_seed(job_seed: int, row_id, sample_index: int) -> int:
    """A sequence's sampling seed: a function of the job seed, row id and sample index only."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in int64
