"""What the driver does with each event of the dispatch loop (jobs/dispatch.py's RunListener).

A done shard is committed, then counted, recorded, measured and shown, one
method each and in that order: its files are published before anything
counts them. Between events, `tick` keeps the record's heartbeat and the
driver's log copy fresh, and stops the run when the user cancels or another
driver has claimed the output.
"""

from __future__ import annotations

import logging
import time

from jobs import driver_metrics
from jobs.cancel import cancel_requested
from jobs.claim import OutputClaim
from jobs.core import storage
from jobs.core.layout import CANCEL
from jobs.core.protocol import CommitRecord, ShardResult
from jobs.core.spec import JobSpec
from jobs.core.times import now
from jobs.output import OutputDir
from jobs.record import HEARTBEAT_S, JobRecord, RecordKeeper, committed_counts
from jobs.run_errors import JobCancelled
from jobs.run_log import COPY_EVERY_S, RunLog
from jobs.scheduler import ShardScheduler, Work

log = logging.getLogger(__name__)

RECORD_EVERY_S = 1.0  # at most this often on commits
CANCEL_POLL_S = 2.0


class CommitListener:
    def __init__(
        self,
        spec: JobSpec,
        out: OutputDir,
        keeper: RecordKeeper,
        claim: OutputClaim,
        run_log: RunLog,
        scheduler: ShardScheduler,
        commits: dict[int, CommitRecord],
        progress_bar,
    ):
        """`commits`: the shards committed so far, by index; this listener adds to it."""
        self.spec, self.out, self.keeper, self.claim, self.run_log = spec, out, keeper, claim, run_log
        self.record, self.scheduler, self.commits, self.bar = keeper.record, scheduler, commits, progress_bar
        self.retried_before = self.record.counts.shards_retried  # by earlier runs
        self.tokens_before = self.record.counts.completion_tokens  # for this run's tokens per second
        self.next_cancel_poll = 0.0

    # -- the dispatch loop's events ------------------------------------------------

    def tick(self) -> None:
        self.count_retries()
        self.keeper.save(every=HEARTBEAT_S)
        driver_metrics.progress(self.spec, self.record, self.scheduler)
        self.run_log.copy(every=COPY_EVERY_S)
        if time.monotonic() >= self.next_cancel_poll:
            self.stop_if_cancelled_or_lost()
            self.next_cancel_poll = time.monotonic() + CANCEL_POLL_S

    def replica_ready(self, info: dict, ready: int) -> None:
        run = self.record.run
        if "replica" not in self.record.model:
            self.record.model["replica"] = info
            run.first_replica_ready_at = now()
            run.mark("first_replica_ready", run.first_replica_ready_at)
        if ready >= run.replica_plan["launched"] and run.all_replicas_ready_at is None:
            run.all_replicas_ready_at = now()

    def shard_done(self, work: Work, result: ShardResult, tries: int) -> None:
        self.write_inline_files(result)
        self.commit(work, result, tries)
        self.recount()
        self.keep_replica_counters(result)
        self.save_record()
        self.record_metrics()
        self.show_progress(result)

    # -- one job each --------------------------------------------------------------

    def stop_if_cancelled_or_lost(self) -> None:
        """Raise JobCancelled on a cancel request; ClaimLost when another driver claimed the output."""
        if cancel_requested(self.out):
            raise JobCancelled(f"cancelled through {self.out.url(CANCEL)}")
        self.claim.check_still_ours()

    def write_inline_files(self, result: ShardResult) -> None:
        """Process-local output (memory://): the replica sent its staged files' bytes back."""
        for url, data in (result.inline_files or {}).items():
            storage.write_bytes(url, data, self.spec.output.storage_options)

    def commit(self, work: Work, result: ShardResult, tries: int) -> None:
        shard, t = work.shard, result.tally
        self.commits[shard.index] = self.out.commit(result, shard, tries)
        self.record.run.timeline["last_commit"] = now()  # the last one's stays
        log.info("committed %s: %d rows, %d failed, %.1fs", shard.name, t.rows_done, t.rows_failed, result.seconds)

    def recount(self) -> None:
        count_committed(self.record, self.commits)
        self.count_retries()

    def count_retries(self) -> None:
        """Shards retried over the job's runs: the earlier runs' and this one's so far."""
        self.record.counts.shards_retried = self.retried_before + self.scheduler.retried

    def keep_replica_counters(self, result: ShardResult) -> None:
        """The replica's engine counters, for the record's run.replicas."""
        if not result.replica:
            return
        # Counters are cumulative, and a replica's shards may report out of order: keep the latest.
        run = self.record.run
        replicas, pid = run.replicas, str(result.replica["pid"])
        if result.replica.get("steps", 0) >= replicas.get(pid, {}).get("steps", 0):
            replicas[pid] = result.replica
        # first_token: the earliest first step of any replica of this run (ISO stamps in UTC sort as times)
        first_steps = [r["first_step_at"] for r in replicas.values() if r.get("first_step_at")]
        if first_steps:
            run.timeline["first_token"] = min(first_steps)

    def save_record(self) -> None:
        self.keeper.save(every=RECORD_EVERY_S)

    def record_metrics(self) -> None:
        driver_metrics.progress(self.spec, self.record, self.scheduler, force=True)

    def show_progress(self, result: ShardResult) -> None:
        t = result.tally
        self.bar.update(t.rows_done + t.rows_failed + t.rows_filtered)
        tokens = self.record.counts.completion_tokens - self.tokens_before
        elapsed = self.bar.format_dict.get("elapsed") or 0
        self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s" if elapsed else "", refresh=False)


def count_committed(record: JobRecord, commits: dict[int, CommitRecord]) -> None:
    """The record's counts, from the commit records (never added up event by event)."""
    for name, value in committed_counts(commits.values()).items():
        setattr(record.counts, name, value)
