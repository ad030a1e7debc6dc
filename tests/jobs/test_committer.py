"""The driver's Committer (jobs/commit_listener.py), without Ray or storage: shards handed over
are committed on one other thread in the order they came, the first failure stops it and
reaches the caller through take(), drain waits for all, and stop commits what came back
within its time and then nothing more."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from jobs.commit_listener import Committer
from jobs.core.plan import Shard
from jobs.core.protocol import CommitRecord, ShardResult, Tally
from jobs.scheduler import Work


def work(i: int) -> Work:
    return Work(Shard(i, "file:///in/a.parquet", "a.parquet", 10 * i, 10 * i + 10))


def result(i: int) -> ShardResult:
    return ShardResult(i, f"attempt-1-{i}", Tally(rows_done=10), 0.1, {"data": f"_staging/{i}"})


def record(i: int) -> CommitRecord:
    return CommitRecord(i, f"part-{i:05d}", f"attempt-1-{i}", f"data/part-{i:05d}.parquet", None, None, Tally(rows_done=10))


class Storage:
    """A commit function that records its calls, and can be held or made to fail on a shard."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[tuple[int, str]] = []  # (shard, thread name)
        self.fail_on = fail_on
        self.gate = threading.Event()  # cleared: a commit waits in it
        self.gate.set()
        self.entered = threading.Event()  # a commit has begun

    def commit(self, w: Work, r: ShardResult, tries: int) -> CommitRecord:
        self.entered.set()
        self.gate.wait(30)
        self.calls.append((w.shard.index, threading.current_thread().name))
        if w.shard.index == self.fail_on:
            raise OSError(f"storage gone at {w.shard.name}")
        return record(w.shard.index)


def test_commits_run_in_order_on_one_other_thread():
    storage = Storage()
    committer = Committer(storage.commit)
    for i in range(5):
        committer.submit(work(i), result(i), 1)
    committer.drain()
    done, failure = committer.take()
    assert failure is None
    assert [c.work.shard.index for c in done] == [0, 1, 2, 3, 4]
    assert [c.record for c in done] == [record(i) for i in range(5)]
    assert {name for _, name in storage.calls} == {"committer"}
    assert committer.take() == ([], None)  # each commit is handed back once
    committer.stop(5)


def test_the_first_failure_stops_the_committer_and_is_handed_over():
    storage = Storage(fail_on=1)
    committer = Committer(storage.commit)
    for i in range(4):
        committer.submit(work(i), result(i), 1)
    committer.drain()  # returns on the failure, with shards still queued behind it
    done, failure = committer.take()
    assert [c.work.shard.index for c in done] == [0]
    assert isinstance(failure, OSError) and "part-00001" in str(failure)
    assert [shard for shard, _ in storage.calls] == [0, 1]  # nothing after the failure
    committer.submit(work(9), result(9), 1)
    committer.drain()
    assert [shard for shard, _ in storage.calls] == [0, 1]
    assert committer.take()[1] is failure  # it stays failed
    committer.stop(5)


def test_drain_waits_for_the_commit_under_way():
    storage = Storage()
    storage.gate.clear()
    committer = Committer(storage.commit)
    committer.submit(work(0), result(0), 1)
    drained = threading.Event()
    waiter = threading.Thread(target=lambda: (committer.drain(), drained.set()))
    waiter.start()
    assert storage.entered.wait(30)
    assert not drained.is_set()  # held in the commit
    storage.gate.set()
    waiter.join(30)
    assert drained.is_set() and [c.work.shard.index for c in committer.take()[0]] == [0]
    committer.stop(5)


def test_stop_commits_what_was_handed_over():
    storage = Storage()
    committer = Committer(storage.commit)
    for i in range(3):
        committer.submit(work(i), result(i), 1)
    committer.stop(30)
    assert [c.work.shard.index for c in committer.take()[0]] == [0, 1, 2]
    committer.submit(work(3), result(3), 1)  # after the stop: never committed
    committer.stop(30)
    assert [shard for shard, _ in storage.calls] == [0, 1, 2]


def test_stop_past_its_time_drops_what_is_queued_and_waits_for_the_commit_under_way():
    storage = Storage()
    storage.gate.clear()
    committer = Committer(storage.commit)
    for i in range(3):
        committer.submit(work(i), result(i), 1)
    assert storage.entered.wait(30)  # shard 0's commit is under way
    committer.stop(0)  # no time: 1 and 2 are dropped, 0 goes on
    assert committer.take() == ([], None)
    storage.gate.set()
    committer.stop(30)  # waits for 0's commit to end
    assert [shard for shard, _ in storage.calls] == [0]  # 1 and 2 were never committed
    assert [c.work.shard.index for c in committer.take()[0]] == [0]  # and 0 is counted


def test_a_committer_never_used_stops_at_once():
    committer = Committer(Storage().commit)
    committer.stop(0)
    assert committer.take() == ([], None)


@pytest.mark.parametrize("shard", [1, 3], ids=["retry-failed replaces a commit", "a new shard"])
def test_the_running_tally_equals_a_recount(shard):
    """The listener adds each commit's tally to a running sum instead of recounting every
    commit record (O(shards^2) over a job); a replaced commit's tally leaves the sum."""
    from jobs.commit_listener import CommitListener, Committed, count_committed
    from jobs.record import JobRecord
    from jobs.scheduler import ShardScheduler

    commits = {i: record(i) for i in range(3)}
    keeper = SimpleNamespace(record=JobRecord(spec={}, fingerprint="f"))
    keeper.record.start_run(None)
    count_committed(keeper.record, commits)  # a resume's first count
    listener = CommitListener(None, None, keeper, None, None, ShardScheduler([], 3), commits, None)
    new = CommitRecord(shard, "p", "attempt-2", "data/p", "errors/p", None, Tally(rows_done=7, rows_failed=3, prompt_tokens=5))
    listener.count(Committed(work(shard), result(shard), 2, new))

    recount = JobRecord(spec={}, fingerprint="f")
    count_committed(recount, commits)
    assert commits[shard] == new
    assert keeper.record.counts == recount.counts
    assert recount.counts.shards_committed == len(commits) and recount.counts.rows_failed == 3
