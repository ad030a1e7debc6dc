"""The stage interface: one step of a replica's work on a shard attempt.

A stage declares the output columns it adds (pyarrow fields, by file) and the
Tally counters it adds to; jobs/core/rows.py's data_fields, error_fields and
filtered_fields stay the files' schema contract, and a test keeps the two in
agreement (tests/workers/test_stages.py). Stages run concurrently for the
shards a replica holds, so a stage keeps no state of one attempt between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from workers.stages.work import ShardWork


@dataclass(frozen=True)
class Columns:
    """Output columns a stage adds, by the file they go to."""

    data: tuple[pa.Field, ...] = ()  # data/, and filtered/ (which has data/'s columns)
    errors: tuple[pa.Field, ...] = ()
    filtered: tuple[pa.Field, ...] = ()  # filtered/ only


class Stage:
    name: str  # in the stage list: what tests and logs call it
    counters: tuple[str, ...] = ()  # the Tally fields (jobs/core/protocol.py) it adds to
    # What it reads of a sequence besides its text (Generated fields: token_ids): a row-cache
    # entry without them is a miss.
    needs: frozenset[str] = frozenset()

    def columns(self, input_schema: pa.Schema) -> Columns:
        """The output columns it adds, given the input columns' types."""
        return Columns()

    def run(self, work: ShardWork) -> ShardWork:
        """The attempt's work with this stage's part done (a new ShardWork)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Its counters over the replica's life, for the job record's run.replicas."""
        return {}

    def publish(self, attempt: str) -> int:
        """The driver committed `attempt`: publish what this stage kept of it; how many items."""
        return 0
