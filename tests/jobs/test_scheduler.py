"""The scheduling policy, without Ray: replicas are plain strings, outcomes are method calls.

Balance (every replica one shard before any gets a second; shards up to a
full engine batch, more only while the queue holds one for every replica),
suspects after a replica death (charged
only when one dies running alone), failed shards retried after the healthy
ones, and max_attempts ending the job; shards past their engine time
(`generated`) making room for the next under `hold`; prefix groups kept on one
replica; a randomized model of all of it (hypothesis); and how many replicas a
run starts and counts on (plan_replicas), as a pure function of the cluster's
node resources.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jobs.core.plan import Shard
from jobs.core.protocol import TaskKind
from jobs.core.spec import ReplicaCount
from jobs.replica_plan import plan_replicas
from jobs.scheduler import IN_FLIGHT_PER_REPLICA, WRITING_PER_REPLICA, ShardExhausted, ShardQueue, ShardScheduler, Work


def shard(i: int, group: int | None = None) -> Shard:
    return Shard(i, "file:///in/a.parquet", "a.parquet", 10 * i, 10 * i + 10, group)


def work(*indices: int) -> list[Work]:
    return [Work(shard(i)) for i in indices]


def grouped(*groups: int | None) -> list[Work]:
    """Shards 0, 1, ... whose prefix groups are `groups`, in that order."""
    return [Work(shard(i, g)) for i, g in enumerate(groups)]


def scheduler(shards: int, replicas: str = "", max_attempts: int = 3, **kwargs) -> ShardScheduler:
    return ready(ShardScheduler(work(*range(shards)), max_attempts, **kwargs), replicas)


def ready(s: ShardScheduler, replicas: str) -> ShardScheduler:
    for r in replicas:
        s.add_replica(r)
    return s


def started(assigned) -> list[tuple[str, int]]:
    return [(replica, w.shard.index) for replica, w, _ in assigned]


def running(s: ShardScheduler) -> dict[str, list[int]]:
    return {r: [slot.work.shard.index for slot in slots] for r, slots in s.in_flight.items()}


def generating(s: ShardScheduler) -> dict[str, list[int]]:
    return {r: [slot.work.shard.index for slot in slots if slot.generating] for r, slots in s.in_flight.items()}


def queued(s: ShardScheduler) -> list[int]:
    return [w.shard.index for w in s.queue]


def first(s: ShardScheduler, replica: str) -> Work:
    return s.in_flight[replica][0].work


# -- balance --------------------------------------------------------------------------------------


def test_every_replica_gets_one_shard_before_any_gets_a_second():
    s = scheduler(10, "ABC")
    assigned = started(s.assign())
    assert assigned[:3] == [("A", 0), ("B", 1), ("C", 2)]
    assert assigned[3:] == [("A", 3), ("B", 4), ("C", 5)]  # queue 7, 6, 5 > 3 replicas: each may take a second
    assert IN_FLIGHT_PER_REPLICA == 2 and all(len(ws) == 2 for ws in s.in_flight.values())
    assert queued(s) == [6, 7, 8, 9]
    assert s.assign() == []  # nothing more until something ends


def test_no_second_shard_unless_the_queue_holds_one_for_every_replica():
    s = scheduler(4, "ABC")
    assert started(s.assign()) == [("A", 0), ("B", 1), ("C", 2)]
    assert queued(s) == [3]  # one left for three replicas: it waits for the first to free up

    s = scheduler(5, "AB")
    # After the first round three are queued for two replicas: A takes a second, which
    # leaves two, one for each replica, so B takes none.
    assert started(s.assign()) == [("A", 0), ("B", 1), ("A", 2)]
    assert queued(s) == [3, 4]


def test_the_last_shards_go_to_whichever_replica_frees_up_first():
    s = scheduler(3, "AB")
    assert started(s.assign()) == [("A", 0), ("B", 1)]
    s.succeeded("B", first(s, "B"))
    assert started(s.assign()) == [("B", 2)]  # not queued behind A's shard
    assert running(s) == {"A": [0], "B": [2]}


@pytest.mark.parametrize("replicas, shards", [(1, 1), (1, 5), (2, 3), (3, 7), (4, 4), (4, 9), (5, 23), (8, 100)])
def test_balance_holds_through_a_whole_job(replicas, shards):
    rng = random.Random(replicas * 1000 + shards)
    names = "ABCDEFGH"[:replicas]
    s = scheduler(shards, names)
    order = []
    while not s.done():
        queue_before = len(s.queue)
        counts = {r: len(ws) for r, ws in s.in_flight.items()}
        for replica, w, tries in s.assign():
            queue_before -= 1
            counts[replica] += 1
            assert tries == 1
            assert counts[replica] <= IN_FLIGHT_PER_REPLICA
            if counts[replica] > 1:
                # A second shard: only while the queue still holds one for every replica
                # (a lone replica has no one to leave it for)...
                assert queue_before >= (replicas if replicas > 1 else 0), (replica, w.shard.index)
                # ...and never while another replica has none.
                assert all(n >= 1 for n in counts.values()), counts
            order.append(w.shard.index)
        assert any(s.in_flight.values()), "work is queued but nothing runs"
        # Some replica finishes one of its shards.
        replica = rng.choice([r for r, ws in s.in_flight.items() if ws])
        s.succeeded(replica, rng.choice(s.in_flight[replica]).work)
    assert order == list(range(shards))  # healthy shards start in order, each once
    assert s.retried == 0 and not s.charged


def test_a_replica_that_joins_later_gets_work():
    s = scheduler(5, "A")
    assert started(s.assign()) == [("A", 0), ("A", 1)]
    s.add_replica("B")
    assert started(s.assign()) == [("B", 2)]  # queue 2 <= 2 replicas: no second for B


def test_a_replica_is_added_once():
    s = scheduler(4, "A")
    s.assign()
    s.add_replica("A")  # again: its shards in flight are kept
    assert running(s) == {"A": [0, 1]}


# -- replica deaths -------------------------------------------------------------------------------


def test_two_shards_on_a_dying_replica_are_not_charged_and_become_suspects():
    s = scheduler(6, "AB")
    assert started(s.assign()) == [("A", 0), ("B", 1), ("A", 2), ("B", 3)]
    lost = s.replica_died("A", "SIGKILL")
    assert [w.shard.index for w in lost] == [0, 2]
    assert not s.charged  # which of the two killed it is unknown
    assert s.suspects == {0, 2}
    assert "A" not in s.in_flight
    assert set(queued(s)[:2]) == {0, 2} and queued(s)[2:] == [4, 5]  # back at the front
    assert s.retried == 2


def test_a_healthy_shard_that_was_alone_on_a_dying_replica_is_not_charged():
    # A node lost with one healthy shard on it: the shard becomes a suspect, it does not lose an attempt.
    s = scheduler(1, "A")
    s.assign()
    s.replica_died("A", "node lost")
    assert not s.charged and s.suspects == {0} and queued(s) == [0]


def test_suspects_run_alone_and_only_on_an_idle_replica():
    s = scheduler(6, "AB")
    s.assign()  # A: 0, 2   B: 1, 3
    s.replica_died("A", "SIGKILL")  # 0 and 2 become suspects
    s.add_replica("C")  # the replacement
    assert started(s.assign()) == [("C", 2)]  # B is busy; C is idle, so it takes a suspect, and nothing beside it
    assert running(s) == {"B": [1, 3], "C": [2]}
    s.succeeded("B", first(s, "B"))
    # B still runs shard 3, so it may not take the suspect 0: it skips to a healthy shard.
    assert started(s.assign()) == [("B", 4)]
    assert queued(s) == [0, 5]
    s.succeeded("B", first(s, "B"))
    s.succeeded("B", first(s, "B"))
    # B is idle now: it may take the suspect, and then nothing else.
    assert started(s.assign()) == [("B", 0)]
    assert running(s) == {"B": [0], "C": [2]} and queued(s) == [5]


def test_a_suspect_that_dies_alone_is_charged():
    s = scheduler(2, "AB", max_attempts=3)
    s.assign()  # A: 0   B: 1
    s.assign()
    s.replica_died("A", "SIGKILL")  # 0 was alone but not a suspect yet: not charged
    assert not s.charged
    s.add_replica("C")
    assert started(s.assign()) == [("C", 0)]
    s.replica_died("C", "SIGKILL")  # a suspect, alone: it did it
    assert s.charged == {0: 1}
    assert s.suspects == {0}  # and it stays a suspect: it runs alone again
    assert queued(s) == [0]
    s.add_replica("D")
    s.succeeded("B", first(s, "B"))
    assigned = s.assign()
    assert started(assigned) == [("B", 0)]
    assert assigned[0][2] == 3  # the third try of shard 0
    s.succeeded("B", first(s, "B"))
    assert s.suspects == set() and s.done()


def test_a_suspect_that_keeps_killing_replicas_ends_the_job():
    s = scheduler(1, "A", max_attempts=2)
    s.assign()
    s.replica_died("A", "first death")  # suspect, uncharged
    s.add_replica("B")
    s.assign()
    s.replica_died("B", "second death")  # charged once
    s.add_replica("C")
    s.assign()
    with pytest.raises(ShardExhausted) as info:
        s.replica_died("C", "third death")
    e = info.value
    assert e.work.shard.index == 0 and e.attempts == 2 and e.error == "replica died: third death"
    assert "part-00000" in str(e) and "third death" in str(e)


def test_a_replica_unknown_to_the_scheduler_dying_loses_nothing():
    s = scheduler(3, "A")
    s.assign()
    assert s.replica_died("never-ready", "failed to start") == []
    assert running(s) == {"A": [0, 1]} and not s.suspects


# -- failures -------------------------------------------------------------------------------------


def test_a_failed_shard_is_retried_after_the_healthy_ones():
    s = scheduler(4, "A")
    assert started(s.assign()) == [("A", 0), ("A", 1)]
    s.failed("A", first(s, "A"), "RuntimeError: boom")
    assert s.charged == {0: 1} and not s.suspects and s.retried == 1
    assert queued(s) == [2, 3, 0]  # to the back of the queue
    order = []
    while not s.done():
        for _, w, tries in s.assign():
            order.append((w.shard.index, tries))
        s.succeeded("A", first(s, "A"))
    assert order == [(2, 1), (3, 1), (0, 2)]  # the healthy shards first; the retry is shard 0's second try


def test_max_attempts_ends_the_job_naming_the_shard_and_its_last_error():
    s = scheduler(3, "AB", max_attempts=2)
    s.assign()  # A: 0   B: 1   (queue 1 <= 2: no seconds)
    s.failed("B", first(s, "B"), "ValueError: first")
    assert s.charged == {1: 1}
    s.succeeded("A", first(s, "A"))
    assert started(s.assign()) == [("A", 2), ("B", 1)]
    with pytest.raises(ShardExhausted) as info:
        s.failed("B", first(s, "B"), "ValueError: second")
    e = info.value
    assert e.work == Work(shard(1)) and e.attempts == 2 and e.error == "ValueError: second"
    assert str(e) == "shard part-00001 failed 2 times; last error: ValueError: second"


def test_max_attempts_one_fails_on_the_first_charge():
    s = scheduler(1, "A", max_attempts=1)
    s.assign()
    with pytest.raises(ShardExhausted, match="part-00000 failed 1 times; last error: boom"):
        s.failed("A", first(s, "A"), "boom")


def test_charges_are_per_shard():
    s = scheduler(4, "AB", max_attempts=2)
    s.assign()  # A: 0, 2   B: 1, 3
    s.failed("A", first(s, "A"), "x")
    s.failed("B", first(s, "B"), "y")  # a different shard's first failure: no exhaustion
    assert s.charged == {0: 1, 1: 1}


def test_retry_failed_work_keeps_its_kind():
    retry = Work(shard(0), TaskKind.RETRY_FAILED)
    s = ShardScheduler([retry, *work(1, 2)], max_attempts=3)
    s.add_replica("A")
    assigned = s.assign()
    assert [w for _, w, _ in assigned] == [retry, Work(shard(1))]
    s.failed("A", retry, "boom")
    assert list(s.queue) == [Work(shard(2)), retry]  # still a retry of the dead letters, not a whole-shard redo


# -- done -----------------------------------------------------------------------------------------


def test_done_only_when_nothing_is_queued_or_in_flight():
    assert ShardScheduler([], max_attempts=3).done()
    s = scheduler(2, "")
    assert not s.done()  # queued, even with no replica ready yet
    s.add_replica("A")
    s.add_replica("B")
    assert s.assign() and not s.done()
    assert not s.queue and not s.done()  # in flight
    s.succeeded("A", first(s, "A"))
    assert not s.done()
    s.succeeded("B", first(s, "B"))
    assert s.done()
    assert s.assign() == [] and s.done()


def test_not_done_after_a_death_requeues_work():
    s = scheduler(1, "A")
    s.assign()
    s.replica_died("A", "gone")
    assert not s.done() and queued(s) == [0]
    assert s.assign() == []  # no replica: the work waits
    s.add_replica("B")
    s.assign()
    s.succeeded("B", first(s, "B"))
    assert s.done()


def test_a_replica_holds_sequences_for_two_batches():
    from jobs.scheduler import shards_per_replica

    assert shards_per_replica(batch_size=32, rows_per_shard=16, samples_per_row=1) == 4
    assert shards_per_replica(batch_size=32, rows_per_shard=8, samples_per_row=2) == 4
    assert shards_per_replica(batch_size=8, rows_per_shard=10, samples_per_row=1) == 2  # never below two
    assert shards_per_replica(batch_size=32, rows_per_shard=1000, samples_per_row=1) == 2


def test_the_first_ready_replica_leaves_a_share_for_those_still_loading():
    shards = [Work(Shard(i, "file:///in.parquet", "in.parquet", 10 * i, 10 * i + 10)) for i in range(4)]
    scheduler = ShardScheduler(shards, max_attempts=3, depth=4, replicas=2)
    scheduler.add_replica("a")
    assert [w.shard.index for _, w, _ in scheduler.assign()] == [0, 1]  # two of four: half is b's
    scheduler.add_replica("b")
    assert [(r, w.shard.index) for r, w, _ in scheduler.assign()] == [("b", 2)]
    assert [w.shard.index for w in scheduler.queue] == [3]  # the last goes to whoever frees up first


def test_replicas_fill_their_batch_before_holding_back_the_last_shards():
    # Two replicas, a batch of two shards: all four go out at once (a replica
    # holding one shard would step half-empty); beyond a batch, one for every replica stays queued.
    s = ready(ShardScheduler(work(*range(4)), 3, depth=4, replicas=2, fill=2), "AB")
    assert started(s.assign()) == [("A", 0), ("B", 1), ("A", 2), ("B", 3)]
    s = ready(ShardScheduler(work(*range(6)), 3, depth=4, replicas=2, fill=2), "AB")
    assert started(s.assign()) == [("A", 0), ("B", 1), ("A", 2), ("B", 3)]
    assert queued(s) == [4, 5]


def test_filling_a_batch_still_leaves_a_shard_for_each_replica_loading():
    s = ready(ShardScheduler(work(*range(3)), 3, depth=4, replicas=3, fill=4), "A")
    assert started(s.assign()) == [("A", 0)]  # two left: one each for the two still loading
    s.add_replica("B")
    assert started(s.assign()) == [("B", 1)]
    s.add_replica("C")
    assert started(s.assign()) == [("C", 2)]


def test_a_lone_replica_holds_back_nothing():
    s = ready(ShardScheduler(work(*range(4)), 3, depth=4, replicas=1, fill=2), "A")
    assert started(s.assign()) == [("A", 0), ("A", 1), ("A", 2), ("A", 3)]


def test_a_shard_per_batch():
    from jobs.scheduler import shards_per_batch

    assert shards_per_batch(batch_size=32, rows_per_shard=16, samples_per_row=1) == 2
    assert shards_per_batch(batch_size=32, rows_per_shard=5, samples_per_row=2) == 4
    assert shards_per_batch(batch_size=8, rows_per_shard=100, samples_per_row=1) == 1


# -- generated: a shard past the engine makes room for the next -----------------------------------


def test_a_replica_whose_shards_are_all_writing_gets_new_work():
    s = scheduler(6, "A")
    assert started(s.assign()) == [("A", 0), ("A", 1)]
    assert s.assign() == []  # two generating: its depth
    s.generated("A", first(s, "A"))
    s.generated("A", s.in_flight["A"][1].work)
    # Both still being parsed and written, and committed later: the engine needs rows now.
    assert started(s.assign()) == [("A", 2), ("A", 3)]
    assert running(s) == {"A": [0, 1, 2, 3]} and generating(s) == {"A": [2, 3]}


def test_hold_caps_every_shard_a_replica_holds():
    s = scheduler(10, "A")
    assert s.hold == IN_FLIGHT_PER_REPLICA + WRITING_PER_REPLICA == 4
    s.assign()
    for _ in range(2):  # each time, every shard it holds finishes generating and none finishes writing
        for slot in s.in_flight["A"]:
            s.generated("A", slot.work)
        s.assign()
    assert running(s) == {"A": [0, 1, 2, 3]} and generating(s) == {"A": []}
    assert s.assign() == []  # nothing generates, but it holds four: hold
    s.succeeded("A", first(s, "A"))  # one written and committed: one more may come
    assert started(s.assign()) == [("A", 4)]


def test_a_shard_past_the_engine_is_still_in_flight():
    s = scheduler(1, "A")
    s.assign()
    s.generated("A", first(s, "A"))
    assert not s.done()  # not committed yet
    assert s.replica_died("A", "SIGKILL") == work(0)  # lost with its replica: it is not committed
    assert queued(s) == [0] and s.suspects == {0}


def test_generated_does_not_end_a_suspect_running_alone():
    s = scheduler(3, "AB")
    s.assign()  # A: 0   B: 1
    s.replica_died("A", "SIGKILL")
    s.add_replica("C")
    assert started(s.assign()) == [("C", 0)]
    s.generated("C", first(s, "C"))
    assert s.assign() == []  # shard 2 waits: nothing beside a suspect, generating or writing
    s.succeeded("C", first(s, "C"))
    assert started(s.assign()) == [("C", 2)]


def test_hold_is_at_least_depth():
    assert ShardScheduler([], 3, depth=4, hold=2).hold == 4
    assert ShardScheduler([], 3, depth=4, hold=7).hold == 7


# -- prefix groups: a group's shards stay on one replica --------------------------------------------


def test_a_replica_takes_the_next_shard_of_its_own_group_first():
    s = ready(ShardScheduler(grouped(7, 8, 7, 8, 7, 8), 3, depth=3, replicas=1), "A")
    assert started(s.assign()) == [("A", 0), ("A", 2), ("A", 4)]  # 7, 7, 7: not the queue's 8s between
    s.succeeded("A", first(s, "A"))
    assert started(s.assign()) == [("A", 1)]  # no 7 left: the first in the queue


def test_a_group_goes_to_the_replica_that_holds_it_while_that_one_has_room():
    s = ready(ShardScheduler(grouped(7, 7, 7, 8, 8, 8), 3, depth=3, replicas=2), "AB")
    # A starts group 7; B skips 7's shards (A has room for them) for group 8's.
    assert started(s.assign()) == [("A", 0), ("B", 3), ("A", 1), ("B", 4)]
    assert queued(s) == [2, 5]  # one held back for each replica


def test_a_replica_keeps_the_group_it_held_last():
    s = ready(ShardScheduler(grouped(7, 8, 8, 7), 3, depth=1, replicas=2), "AB")
    assert started(s.assign()) == [("A", 0), ("B", 1)]
    s.succeeded("A", first(s, "A"))  # A holds nothing now, but held group 7 last
    assert started(s.assign()) == [("A", 3)]
    s.succeeded("B", first(s, "B"))
    assert started(s.assign()) == [("B", 2)]


def test_a_replica_never_idles_for_another_replicas_group():
    s = ready(ShardScheduler(grouped(7, 7, 7, 7), 3, depth=2, replicas=2), "AB")
    # Only group 7 is queued: B takes one of A's group rather than wait.
    assert started(s.assign()) == [("A", 0), ("B", 1)]


def test_a_full_replica_does_not_keep_its_group_from_another():
    s = ready(ShardScheduler(grouped(7, 7, 7, 8, 7), 3, depth=2, replicas=1, hold=2), "A")
    assert started(s.assign()) == [("A", 0), ("A", 1)]  # A is full (depth 2)
    s.add_replica("B")
    assert started(s.assign()) == [("B", 2)]  # group 7's next: A has no room for it


def test_ungrouped_shards_keep_fifo_order_beside_groups():
    s = ready(ShardScheduler(grouped(None, 7, None, 7), 3, depth=4, replicas=1), "A")
    assert started(s.assign()) == [("A", 0), ("A", 1), ("A", 3), ("A", 2)]  # 1's group pulls 3 ahead of 2


def test_a_suspect_of_a_group_still_runs_alone():
    s = ready(ShardScheduler(grouped(7, 7, 7), 3, depth=2, replicas=1), "A")
    s.assign()  # A: 0, 1
    s.replica_died("A", "SIGKILL")
    s.add_replica("B")
    assert started(s.assign()) == [("B", 1)]  # a suspect (its group's and the queue's first), alone
    s.succeeded("B", first(s, "B"))
    assert started(s.assign()) == [("B", 0)]


def test_the_queue_keeps_its_order_across_groups():
    q = ShardQueue(grouped(7, None, 8, 7))
    q.appendleft(Work(shard(9, 8)))
    q.append(Work(shard(10)))
    assert [w.shard.index for w in q] == [9, 0, 1, 2, 3, 10] and len(q) == 6
    assert q.take(lambda w: True, prefer={7}).shard.index == 0
    assert q.take(lambda w: True, avoid={8}).shard.index == 1
    assert q.take(lambda w: w.shard.index != 9).shard.index == 2
    assert q.take(lambda w: False) is None
    assert [w.shard.index for w in q] == [9, 3, 10] and q.grouped()


# -- the model: every interleaving keeps the scheduler's promises -----------------------------------


class SchedulerModel(RuleBasedStateMachine):
    """Random interleavings of replicas joining and dying, shards assigned, generated,
    succeeding and failing, on shards of a few prefix groups. After every step: each shard is
    in exactly one place (queued, held by one replica, done), no replica holds more than
    `hold` or generates more than `depth`, a suspect runs alone, and after assign() a ready
    replica with room and nothing generating got work whenever the queue had some it may take.
    (max_attempts is out of reach here: exhaustion has its own tests above.)"""

    SHARDS = 12

    def __init__(self):
        super().__init__()
        self.s: ShardScheduler | None = None
        self.names = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        self.succeeded: set[int] = set()

    @precondition(lambda self: self.s is None)
    @rule(
        groups=st.lists(st.sampled_from([None, 1, 2, 3]), min_size=SHARDS, max_size=SHARDS),
        depth=st.integers(1, 4),
        fill=st.integers(1, 4),
        replicas=st.integers(1, 3),
        extra=st.integers(0, 3),
    )
    def start(self, groups, depth, fill, replicas, extra):
        self.s = ShardScheduler(grouped(*groups), 10**6, depth=depth, replicas=replicas, fill=fill, hold=depth + extra)

    def live(self) -> bool:
        return self.s is not None

    def slots(self) -> list:
        return [(r, slot) for r, slots in self.s.in_flight.items() for slot in slots]

    @precondition(lambda self: self.live() and len(self.s.in_flight) < 4)
    @rule()
    def add_replica(self):
        self.s.add_replica(next(self.names))

    @precondition(lambda self: self.live())
    @rule()
    def assign(self):
        s = self.s
        for replica, w, tries in s.assign():
            assert tries == s.dispatches[w.shard.index]
        for replica, slots in s.in_flight.items():
            held_suspect = any(slot.work.shard.index in s.suspects for slot in slots)
            if any(slot.generating for slot in slots) or len(slots) >= s.hold or held_suspect:
                continue
            may_take = [w for w in s.queue if not slots or w.shard.index not in s.suspects]
            assert not may_take, f"{replica} has room and nothing generating, and {may_take[0]} waits"

    @precondition(lambda self: self.live() and any(slot.generating for _, slot in self.slots()))
    @rule(data=st.data())
    def generated(self, data):
        replica, slot = data.draw(st.sampled_from([(r, slot) for r, slot in self.slots() if slot.generating]))
        self.s.generated(replica, slot.work)

    @precondition(lambda self: self.live() and self.slots())
    @rule(data=st.data())
    def succeed(self, data):
        replica, slot = data.draw(st.sampled_from(self.slots()))
        self.s.succeeded(replica, slot.work)
        self.succeeded.add(slot.work.shard.index)

    @precondition(lambda self: self.live() and self.slots())
    @rule(data=st.data())
    def fail(self, data):
        replica, slot = data.draw(st.sampled_from(self.slots()))
        self.s.failed(replica, slot.work, "boom")

    @precondition(lambda self: self.live() and self.s.in_flight)
    @rule(data=st.data())
    def replica_dies(self, data):
        self.s.replica_died(data.draw(st.sampled_from(sorted(self.s.in_flight))), "SIGKILL")

    @invariant()
    def every_shard_in_one_place(self):
        if not self.live():
            return
        places = [w.shard.index for w in self.s.queue] + [slot.work.shard.index for _, slot in self.slots()]
        places += sorted(self.succeeded)
        assert sorted(places) == list(range(self.SHARDS)), places
        assert len(self.s.queue) == len(list(self.s.queue))

    @invariant()
    def within_hold_and_depth(self):
        if not self.live():
            return
        for slots in self.s.in_flight.values():
            assert len(slots) <= self.s.hold
            assert sum(slot.generating for slot in slots) <= self.s.depth
            if any(slot.work.shard.index in self.s.suspects for slot in slots):
                assert len(slots) == 1, "a suspect shares its replica"


TestSchedulerModel = SchedulerModel.TestCase
TestSchedulerModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- how many replicas: resources.replicas against the cluster's nodes -----------------------------

CPU1 = {"CPU": 1.0, "GPU": 0.0}  # a replica's need at the spec's defaults
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def node(cpus: float, gpus: float = 0, **other) -> dict[str, float]:
    """A node's total resources as ray.nodes() reports them (memory and the node's own ip resource too)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), "memory": 8e9, "node:127.0.0.1": 1.0, **other}


def test_auto_on_this_two_core_machine_is_two_replicas():
    plan = plan_replicas(ReplicaCount.parse("auto"), CPU1, [node(2)])
    assert (plan.launch, plan.expect) == (2, 2)
    assert plan.how == "auto: 2 CPUs / 1 per replica"


@pytest.mark.parametrize(
    "need, nodes, count, how",
    [
        (CPU1, [node(8), node(8)], 16, "auto: 16 CPUs / 1 per replica"),
        ({"CPU": 2.0, "GPU": 0.0}, [node(7)], 3, "auto: 7 CPUs / 2 per replica"),  # floor
        ({"CPU": 0.5, "GPU": 0.0}, [node(2)], 4, "auto: 2 CPUs / 0.5 per replica"),
        ({"CPU": 0.1, "GPU": 0.0}, [node(0.3)], 3, "auto: 0.3 CPUs / 0.1 per replica"),  # not 2.9999
        # GPUs decide when a replica asks for one; the CPUs are not counted
        (GPU1, [node(32, 8), node(32, 8)], 16, "auto: 16 GPUs / 1 per replica"),
        ({"CPU": 1.0, "GPU": 0.5}, [node(16, 2)], 4, "auto: 2 GPUs / 0.5 per replica"),
        ({"CPU": 1.0, "GPU": 2.0}, [node(4), node(16, 8)], 4, "auto: 8 GPUs / 2 per replica"),
        # a replica never spans nodes, and it needs its CPU beside its GPU: node by node
        (GPU1, [node(4, 8)], 4, "auto: 8 GPUs / 1 per replica, 4 fit node by node"),
        ({"CPU": 1.0, "GPU": 2.0}, [node(8, 3), node(8, 3)], 2, "auto: 6 GPUs / 2 per replica, 2 fit node by node"),
        # nothing fits (the check before refuses that unless an autoscaler may add a node): still one
        (GPU1, [node(2)], 1, "auto: 0 GPUs / 1 per replica"),
        # a replica that asks for nothing: one per CPU
        ({"CPU": 0.0, "GPU": 0.0}, [node(3)], 3, "auto: 3 CPUs / 1 per replica"),
    ],
)
def test_auto_is_what_the_nodes_hold_at_the_replica_size(need, nodes, count, how):
    plan = plan_replicas(ReplicaCount.parse("auto"), need, nodes)
    assert (plan.launch, plan.expect, plan.how) == (count, count, how)


def test_a_fixed_count_is_kept_whatever_the_cluster_holds():
    for nodes in ([node(2)], [node(64)], []):
        plan = plan_replicas(ReplicaCount.parse(3), CPU1, nodes)
        assert (plan.launch, plan.expect) == (3, 3)
    assert plan_replicas(ReplicaCount.parse(3), CPU1, [node(2)]).how == "3, as the spec says (the cluster holds 2)"


@pytest.mark.parametrize(
    "nodes, expect, how",
    [
        ([node(2)], 2, "2..8: the cluster holds 2 now; 6 wait for new nodes"),
        ([node(5)], 5, "2..8: the cluster holds 5 now; 3 wait for new nodes"),
        ([node(4), node(4)], 8, "2..8: the cluster holds 8 now"),
        ([node(64)], 8, "2..8: the cluster holds 64 now"),  # never more than MAX
        ([node(0)], 2, "2..8: the cluster holds 0 now; 8 wait for new nodes"),  # at least MIN: the spec's promise
        ([], 2, "2..8: the cluster holds 0 now; 8 wait for new nodes"),
    ],
)
def test_a_range_starts_max_and_counts_on_those_the_cluster_holds_now(nodes, expect, how):
    plan = plan_replicas(ReplicaCount.parse("2..8"), CPU1, nodes)
    assert plan.launch == 8  # all at once: the pending ones are the autoscaler's demand
    assert plan.expect == expect and plan.how == how


def test_a_range_does_not_starve_the_ready_replicas_for_those_that_wait_for_nodes():
    # 2..8 on a 2-CPU cluster: the scheduler counts on 2, not 8. With 8 it would hold back
    # a shard for each of the six that may never come, and the ready replicas' batches
    # would stay underfilled (one shard each of the two that fill a batch) for the whole job.
    plan = plan_replicas(ReplicaCount.parse("2..8"), CPU1, [node(2)])
    s = ready(ShardScheduler(work(*range(8)), 3, depth=4, replicas=plan.expect, fill=2), "AB")
    # Both batches full at once (and a third shard each: the queue still holds one per replica).
    assert started(s.assign()) == [("A", 0), ("B", 1), ("A", 2), ("B", 3), ("A", 4), ("B", 5)]
    starved = ready(ShardScheduler(work(*range(8)), 3, depth=4, replicas=8, fill=2), "AB")
    assert started(starved.assign()) == [("A", 0), ("B", 1)]  # what counting on MAX would do
    # A replica that joins when its node arrives still gets work.
    s.add_replica("C")
    assert started(s.assign())[0] == ("C", 6)
