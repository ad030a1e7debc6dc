"""What the driver does with each event of the dispatch loop (jobs/dispatch.py's RunListener).

A done shard is committed, then counted, recorded, measured and shown, one
method each and in that order: its files are published before anything
counts them. The commit itself runs on one Committer thread, in the order the
shards came, so the loop sends replicas their next shard meanwhile (a commit is
3-6 storage operations: milliseconds locally, a second on S3); the loop thread
takes the finished commits and does the rest, and a commit's failure stops the
run there. Between events, `tick` keeps the record's heartbeat and the
driver's log copy fresh, and stops the run when the user cancels or another
driver has claimed the output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from jobs import driver_metrics
from jobs.cancel import cancel_requested
from jobs.claim import OutputClaim
from jobs.core import faults, storage
from jobs.core.layout import CANCEL
from jobs.core.protocol import CommitRecord, ShardResult, Tally
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
# A run that stops early (an error, Ctrl-C) still commits the shards whose results came back,
# as it did when commits were inline, for up to this long; a shard left over is run again by
# the resume (committed or not, each is exactly once).
STOP_WAIT_S = 10.0


@dataclass(frozen=True)
class Committed:
    work: Work
    result: ShardResult
    tries: int
    record: CommitRecord


class Committer:
    """Commits shards on one thread, in the order they are handed over: one at a time keeps
    each commit's own order of steps (jobs/output.py), and no order across shards is promised.
    The first failure stops it; `take` hands it to the caller's thread."""

    def __init__(self, commit: Callable[[Work, ShardResult, int], CommitRecord]):
        self._commit = commit
        self._cv = threading.Condition()
        self._todo: deque[tuple[Work, ShardResult, int]] = deque()
        self._done: list[Committed] = []
        self._busy = False  # a commit is under way
        self._failure: BaseException | None = None
        self._closing = False  # stop() was called: end once nothing is left
        self._stopped = False  # commit nothing more
        self._thread: threading.Thread | None = None

    def submit(self, work: Work, result: ShardResult, tries: int) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="committer", daemon=True)
                self._thread.start()
            self._todo.append((work, result, tries))
            self._cv.notify_all()

    def take(self) -> tuple[list[Committed], BaseException | None]:
        """The commits finished since the last call, in order, and the failure that stopped the committer."""
        with self._cv:
            done, self._done = self._done, []
            return done, self._failure

    def drain(self) -> None:
        """Wait until every shard handed over is committed, or a commit failed."""
        with self._cv:
            self._cv.wait_for(lambda: not (self._todo or self._busy) or self._failure is not None)

    def stop(self, timeout: float) -> None:
        """Commit what was handed over for up to `timeout` s, then nothing more (a commit under way ends)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._stopped = True
            self._todo.clear()

    def _serve(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._todo or self._stopped or self._closing)
                if self._stopped or not self._todo:
                    return
                work, result, tries = self._todo.popleft()
                self._busy = True
            try:
                record = self._commit(work, result, tries)
            except BaseException as e:  # ClaimLost, storage gone: the loop thread raises it
                with self._cv:
                    self._failure, self._busy, self._stopped = e, False, True
                    self._todo.clear()
                    self._cv.notify_all()
                return
            with self._cv:
                self._done.append(Committed(work, result, tries, record))
                self._busy = False
                self._cv.notify_all()


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
        self.committer = Committer(self.commit)
        # The committed shards' tallies summed, kept as commits come (a recount is O(shards) each time).
        self.tally = sum((c.tally for c in commits.values()), Tally())
        self.newly_committed: list[ShardResult] = []  # for `committed`

    # -- the dispatch loop's events ------------------------------------------------

    def tick(self) -> None:
        self.take_commits()
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
        """Hand the shard to the committer; it is counted once its commit returns (take_commits)."""
        self.committer.submit(work, result, tries)

    def committed(self) -> list[ShardResult]:
        """The shards committed since the last call (their results): their rows may enter the row
        cache now. Raises a commit's failure."""
        self.take_commits()
        done, self.newly_committed = self.newly_committed, []
        return done

    def finish(self) -> None:
        """Wait for every shard handed over to be committed, and count it. Raises a commit's failure."""
        self.committer.drain()
        self.take_commits()

    def close(self) -> None:
        """The run ended, maybe early: commit what came back (up to STOP_WAIT_S), and count it."""
        self.committer.stop(STOP_WAIT_S)
        for c in self.committer.take()[0]:
            self.count(c)

    # -- one job each --------------------------------------------------------------

    def stop_if_cancelled_or_lost(self) -> None:
        """Raise JobCancelled on a cancel request; ClaimLost when another driver claimed the output."""
        if cancel_requested(self.out):
            raise JobCancelled(f"cancelled through {self.out.url(CANCEL)}")
        self.claim.check_still_ours()

    def commit(self, work: Work, result: ShardResult, tries: int) -> CommitRecord:
        """On the committer's thread: publish the shard's files, then its commit record."""
        faults.inject("committer.before_record", shard=work.shard.index, attempt=result.attempt)
        self.write_inline_files(result)
        shard, t = work.shard, result.tally
        record = self.out.commit(result, shard, tries)
        log.info("committed %s: %d rows, %d failed, %.1fs", shard.name, t.rows_done, t.rows_failed, result.seconds)
        return record

    def write_inline_files(self, result: ShardResult) -> None:
        """Process-local output (memory://): the replica sent its staged files' bytes back."""
        for url, data in (result.inline_files or {}).items():
            storage.write_bytes(url, data, self.spec.output.storage_options)

    def take_commits(self) -> None:
        """Count, record, measure and show the commits the committer finished; then raise its failure."""
        done, failure = self.committer.take()
        for c in done:
            self.count(c)
            self.save_record()
            self.record_metrics()
            self.show_progress(c.result)
            self.newly_committed.append(c.result)
        if failure is not None:
            raise failure

    def count(self, c: Committed) -> None:
        previous = self.commits.get(c.work.shard.index)  # retry-failed replaces a shard's commit
        self.commits[c.work.shard.index] = c.record
        self.record.run.timeline["last_commit"] = now()  # the last one's stays
        self.tally = self.tally + c.record.tally - (previous.tally if previous else Tally())
        set_counts(self.record, len(self.commits), self.tally)
        self.count_retries()
        self.keep_replica_counters(c.result)

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
    """The record's counts, recounted from every commit record: a run's first count (a resume's
    earlier commits); the listener then adds each commit's tally as it comes."""
    for name, value in committed_counts(commits.values()).items():
        setattr(record.counts, name, value)


def set_counts(record: JobRecord, shards: int, tally: Tally) -> None:
    """The record's committed counts: `shards` committed, whose tallies sum to `tally`."""
    for name, value in {"shards_committed": shards, **tally.to_json()}.items():
        setattr(record.counts, name, value)
