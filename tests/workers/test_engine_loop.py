"""The replica's engine loop: one thread builds the engine and steps it; shards' threads feed it."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from jobs.core.errors import ModelError
from tests.workers.test_engine import lm, make_engine, requests  # noqa: F401 (lm is a fixture)
from workers.engine_loop import EngineLoop


def test_the_engine_is_built_and_stepped_on_the_loops_own_thread(lm):  # noqa: F811
    threads: dict[str, set[int]] = {"built": set(), "submit": set(), "step": set()}

    def build():
        threads["built"].add(threading.get_ident())
        engine = make_engine(lm)
        for name in ("submit", "step"):
            method = getattr(engine, name)

            def recorded(*args, name=name, method=method):
                threads[name].add(threading.get_ident())
                return method(*args)

            setattr(engine, name, recorded)
        return engine

    loop = EngineLoop(build)
    # Two shards' threads at once, as a replica's threaded actor calls it.
    results: list = [None, None]
    reqs = requests(lm)
    callers = [threading.Thread(target=lambda i=i: results.__setitem__(i, loop.generate(reqs))) for i in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)
    assert results[0] is not None and results[0] == results[1]
    assert [c.key for c in results[0]] == [r.key for r in reqs]
    # One thread did every torch call, neither this one nor a caller's: on CPU each
    # thread running torch's kernels keeps an OpenMP team of its own (engine_loop.py).
    assert len(threads["built"]) == 1 and threads["submit"] == threads["step"] == threads["built"]
    assert threads["built"].isdisjoint({threading.get_ident(), *(t.ident for t in callers)})


def test_an_engine_that_cannot_be_built_fails_the_constructor():
    def build():
        raise ModelError("model.path /nowhere: no config.json")

    with pytest.raises(ModelError, match="/nowhere"):
        EngineLoop(build)


def test_a_shard_arriving_mid_generation_joins_at_the_next_step(lm):  # noqa: F811
    # At each step's start: the shards handed over and not yet submitted to the engine.
    waiting_at_step: list[list[int]] = []
    box = {}

    def build():
        engine = make_engine(lm, batch_size=8)
        step = engine.step

        def recorded_step():
            with box["loop"]._cv:
                waiting_at_step.append([id(ticket) for ticket in box["loop"]._arrived])
            return step()

        engine.step = recorded_step
        return engine

    box["loop"] = loop = EngineLoop(build)
    first = threading.Thread(target=loop.generate, args=(requests(lm, max_new=100),))  # within the 128 positions
    first.start()
    while len(waiting_at_step) < 20 and first.is_alive():  # the first shard is decoding
        threading.Event().wait(0.001)
    assert first.is_alive(), "the first shard ended before the second arrived: nothing to join"
    second = loop.generate(requests(lm, max_new=2, seed=100))
    first.join(120)
    assert len(second) == 3
    # A shard handed over mid-step is submitted before the next step: the engine thread
    # never steps twice while one waits (held through steps, the lock once kept a
    # shard's thread out for 186 of them).
    waits = Counter(ticket for waiting in waiting_at_step for ticket in waiting)
    assert max(waits.values(), default=0) <= 1, waits


def test_sequences_left_counts_what_the_loop_holds(lm):  # noqa: F811
    from tests.waiting import wait_for

    gate = threading.Event()  # the engine does not step until it is set

    def build():
        engine = make_engine(lm)
        step = engine.step
        engine.step = lambda: (gate.wait(60), step())[1]
        return engine

    loop = EngineLoop(build)
    assert loop.sequences_left() == 0
    reqs = requests(lm)
    caller = threading.Thread(target=loop.generate, args=(reqs,))
    caller.start()
    # Handed over, then submitted: counted either way, until they finish.
    wait_for(lambda: loop.sequences_left() == len(reqs), 60, "the shard's sequences in the loop")
    gate.set()
    caller.join(60)
    assert not caller.is_alive() and loop.sequences_left() == 0
