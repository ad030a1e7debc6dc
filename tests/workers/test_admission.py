"""WaitingQueue: one admission order across shards, prefix groups together, aging."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.admission import WaitingQueue
from workers.engine import Request

PREFIX = tuple(range(100, 164))  # 64 tokens: a prefix worth a key (jobs/core/prefix.py MIN_SHARED_PREFIX)


def req(key, length: int, head: tuple[int, ...] = (), seed: int = 0) -> Request:
    """A request whose prompt starts with `head` and is `length` tokens long."""
    rest = tuple(1000 + hash((key, i)) % 500 for i in range(length - len(head)))
    return Request(key, head + rest, seed, 8)


def drain(queue: WaitingQueue) -> list:
    keys = []
    while queue:
        queue.begin_admission()
        assert queue.head() is queue.head()
        keys.append(queue.pop().key)
    return keys


def test_longest_prompts_first_across_shards():
    queue = WaitingQueue()
    queue.push([req("a5", 5), req("a30", 30)])
    queue.push([req("b20", 20), req("b40", 40), req("b1", 1)])
    assert len(queue) == 5
    assert drain(queue) == ["b40", "a30", "b20", "a5", "b1"]
    assert not queue and len(queue) == 0


def test_rows_sharing_a_prefix_are_admitted_together_at_the_first_ones_place():
    queue = WaitingQueue()
    other = tuple(range(200, 264))
    queue.push([req("p90", 90, PREFIX), req("x100", 100), req("q70", 70, other), req("x10", 10)])
    queue.push([req("p120", 120, PREFIX), req("x95", 95), req("q200", 200, other), req("p80", 80, PREFIX)])
    # The PREFIX group sits where its first row (90 tokens) sorts, longest first inside; so does `other`'s (70).
    assert drain(queue) == ["x100", "x95", "p120", "p90", "p80", "q200", "q70", "x10"]


def test_a_group_that_left_the_queue_is_placed_anew():
    queue = WaitingQueue()
    queue.push([req("p90", 90, PREFIX)])
    assert drain(queue) == ["p90"]
    queue.push([req("x100", 100), req("p150", 150, PREFIX)])
    assert drain(queue) == ["p150", "x100"]


def test_a_shard_waits_at_most_age_steps_admissions():
    queue = WaitingQueue(age_steps=3)
    queue.push([req("old-a", 2), req("old-b", 3)])
    served = []
    for i in range(8):  # a new shard of longer prompts arrives before every admission
        queue.push([req(f"new{i}", 50 + i)])
        queue.begin_admission()
        served.append(queue.pop().key)
    # Admissions 1-3 go by length; from the 4th the old shard has waited over 3: its rows go first,
    # in their order. Then the longest again, until new3 and new4 have waited over 3 admissions too.
    assert served == ["new0", "new1", "new2", "old-b", "old-a", "new5", "new3", "new4"]


def test_aging_serves_a_whole_admission_from_the_aged_shard_then_order_resumes():
    queue = WaitingQueue(age_steps=1)
    queue.push([req("s1", 1), req("s2", 2), req("s3", 3)])
    queue.push([req("L1", 60), req("L2", 70)])
    queue.begin_admission()
    assert queue.pop().key == "L2"  # not aged yet
    queue.begin_admission()  # the first shard has now waited 2 > 1 admissions
    assert [queue.pop().key for _ in range(3)] == ["s3", "s2", "s1"]
    assert queue.pop().key == "L1"  # its shard gone, length order again
    assert not queue


def test_requeued_requests_go_first_in_their_order():
    queue = WaitingQueue()
    queue.push([req("long", 90), req("short", 3)])
    suspects = [req("s1", 5), req("s2", 4)]
    queue.push_front(suspects)
    assert len(queue) == 4
    assert drain(queue) == ["s1", "s2", "long", "short"]


def test_iteration_and_clear_see_every_waiting_request_once():
    queue = WaitingQueue(age_steps=0)
    reqs = [req(i, 10 + i) for i in range(6)]
    queue.push(reqs[:3])
    queue.push(reqs[3:])
    queue.push_front([req("f", 1)])
    queue.begin_admission()
    queue.pop()  # "f"
    queue.pop()  # from the aged (first) shard, out of heap order
    left = list(queue)
    assert len(left) == len(queue) == 5
    assert {r.key for r in left} | {2} == {r.key for r in reqs}
    queue.clear()
    assert not queue and list(queue) == []


def test_order_never_changes_a_request():
    queue = WaitingQueue()
    reqs = [req(i, 5 + (i * 7) % 40, PREFIX if i % 3 == 0 and i else (), seed=1000 + i) for i in range(12)]
    for at in range(0, 12, 4):
        queue.push(reqs[at : at + 4])
    out = []
    while queue:
        queue.begin_admission()
        out.append(queue.pop())
    assert sorted(out, key=lambda r: r.key) == reqs  # the same requests, seeds included


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.tuples(st.just("push"), st.lists(st.tuples(st.booleans(), st.integers(1, 80)), min_size=1, max_size=6)),
    st.tuples(st.just("pop"), st.integers(1, 4)),
    st.tuples(st.just("admission"), st.just(0)),
    st.tuples(st.just("requeue"), st.integers(1, 3)),
), max_size=40), st.integers(1, 4))
def test_any_interleaving_serves_every_request_once(steps, age_steps):
    """Pushes, admissions, pops and requeues in any order, aging on: each request comes out
    once, the size is always right, and head() is what pop() returns."""
    queue, waiting, served, names = WaitingQueue(age_steps), set(), [], iter(range(10_000))
    for op, arg in steps:
        if op == "push":
            batch = [req(f"r{next(names)}", n, PREFIX if shared else ()) for shared, n in arg]
            queue.push(batch)
            waiting |= {r.key for r in batch}
        elif op == "admission":
            queue.begin_admission()
        elif op == "pop":
            for _ in range(min(arg, len(queue))):
                head = queue.head()
                assert queue.pop() is head
                waiting.remove(head.key)
                served.append(head)
        else:  # a failed batch's rows, put back first
            back, served = served[-arg:], served[:-arg]
            queue.push_front(back)
            waiting |= {r.key for r in back}
        assert len(queue) == len(waiting) and {r.key for r in queue} == waiting
    assert sorted(drain(queue)) == sorted(waiting)
