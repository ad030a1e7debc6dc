"""Ray worker setup hook: lets the benchmark read each replica's engine counters.

The replica's Engine keeps `stats` (token positions computed with and without
padding, decode steps) in its own process, and the job record does not carry
them. Ray runs `setup` in every worker it starts (runtime_env
`worker_process_setup_hook`); it wraps Engine.step so that whenever the
engine runs out of work it writes its counters to BENCH_STATS_DIR. The cost is
one `has_work()` check per step. It also notes when each engine was created
(its replica had loaded the model), first stepped and last went idle, which
shows how evenly the replicas shared the work. Benchmark code only; the
product never imports it. (It is also how an engine change can be tried
end to end before it is proposed: patch workers.engine in `_patch`.)
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time

SETUP_HOOK = "bench.hooks.setup"
STATS_DIR_ENV = "BENCH_STATS_DIR"


def setup() -> None:
    """Patch workers.engine when (and if) this worker imports it: most Ray workers never
    do, and importing torch in each of them would slow the cluster's start."""
    if os.environ.get(STATS_DIR_ENV):
        sys.meta_path.insert(0, _AfterImport("workers.engine", _patch))


def _patch(engine) -> None:
    where = os.environ[STATS_DIR_ENV]
    init, step = engine.Engine.__init__, engine.Engine.step

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.bench_times = {"created_at": time.time()}  # the replica has loaded its model

    def counted_step(self):
        self.bench_times.setdefault("first_step_at", time.time())
        finished = step(self)
        if not self.has_work():
            self.bench_times["idle_at"] = time.time()
            path = os.path.join(where, f"engine-{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump({**self.stats, **self.bench_times}, f)
            os.replace(path + ".tmp", path)
        return finished

    engine.Engine.__init__ = timed_init
    engine.Engine.step = counted_step


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after the module `name` is first imported."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec, and patch once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            self.callback(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def read_stats(where: str) -> dict:
    """Every replica's counters summed; the timestamps (time.time()) as lists, one per replica."""
    total: dict = {}
    for name in sorted(os.listdir(where)):
        if name.startswith("engine-") and name.endswith(".json"):
            with open(os.path.join(where, name)) as f:
                for k, v in json.load(f).items():
                    if k.endswith("_at"):
                        total.setdefault(k, []).append(v)
                    else:
                        total[k] = total.get(k, 0) + v
    return total
