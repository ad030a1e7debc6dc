"""The replica's engine loop: one thread builds the engine and steps it; shards' threads feed it."""

from __future__ import annotations

import threading

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
    steps = {"done": 0, "at_submit": []}

    def build():
        engine = make_engine(lm, batch_size=8)
        step, submit = engine.step, engine.submit

        def counted_step():
            out = step()
            steps["done"] += 1
            return out

        def recorded_submit(requests):
            steps["at_submit"].append(steps["done"])
            return submit(requests)

        engine.step, engine.submit = counted_step, recorded_submit
        return engine

    loop = EngineLoop(build)
    first = threading.Thread(target=loop.generate, args=(requests(lm, max_new=400),))
    first.start()
    while steps["done"] < 20 and first.is_alive():  # the first shard is decoding
        threading.Event().wait(0.001)
    called_at = steps["done"]
    assert first.is_alive(), "the first shard ended before the second arrived: nothing to join"
    second = loop.generate(requests(lm, max_new=2, seed=100))
    first.join(120)
    assert len(second) == 3
    # Handed over between two steps: the engine thread never holds the lock through a
    # step, so a shard's thread does not wait behind step after step.
    assert steps["at_submit"][1] - called_at <= 1, steps
