"""The Ray plumbing of a run: start replicas, send them the scheduler's shards,
wait, and hand every outcome back. Which shard goes where and what a shard's
failure costs is jobs/scheduler.py's; what a committed shard means is the
listener's (the driver's).

What it decides itself is the replicas' lifecycle: a replica that dies is
replaced at once; one that fails to start is started again, until
shards.max_attempts fail in a row (ReplicasFailToStart); and a shard's rows go
to the row cache only after the listener has committed it, waited for (up to
PUBLISH_WAIT_S) before the replicas stop.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

from jobs.core import storage
from jobs.core.protocol import ShardResult, ShardTask
from jobs.core.rows import read_shard_rows
from jobs.core.spec import JobSpec
from jobs.scheduler import ShardScheduler, Work

log = logging.getLogger(__name__)

WAIT_S = 1.0  # longest wait for an outcome before the listener's tick (heartbeat, cancel)
PUBLISH_WAIT_S = 300.0  # at the end, for the replicas' last writes to the row cache


class RunListener(Protocol):
    def tick(self) -> None:
        """Called at least every WAIT_S; may raise to stop the run (cancel)."""

    def replica_ready(self, info: dict, ready: int) -> None: ...

    def shard_done(self, work: Work, result: ShardResult, tries: int) -> None: ...


class ReplicasFailToStart(RuntimeError):
    pass


def run_shards(spec: JobSpec, scheduler: ShardScheduler, job_facts: dict, listener: RunListener, replicas: int) -> None:
    """Run the scheduler's work on `replicas` replica actors until it is done. Raises
    ShardExhausted, ReplicasFailToStart, or whatever the listener raises.

    All are launched at once; those the cluster has no room for stay pending
    (an autoscaler's cue to add nodes) and join when placed and loaded."""
    import ray

    pool = _ReplicaPool(spec, job_facts, scheduler.depth)
    # memory:// lives in this process only: the rows travel through Ray instead.
    inline_input = storage.process_local(spec.input.uri, spec.input.storage_options)
    in_flight: dict = {}  # ObjectRef -> (replica, work, tries)
    publishing: list = []  # committed shards' rows on their way to the row cache
    try:
        pool.start(replicas)
        while not scheduler.done():
            listener.tick()
            for replica, work, tries in scheduler.assign():
                attempt = f"attempt-{tries}-{uuid.uuid4().hex[:8]}"
                rows = read_shard_rows(spec, work.shard) if inline_input else None
                ref = replica.run.remote(ShardTask(work.shard, attempt, work.kind, rows))
                in_flight[ref] = (replica, work, tries)
            done, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=WAIT_S)
            for ref in done:
                if ref in pool.starting:
                    replica, info = pool.started(ref)
                    if replica is not None:
                        scheduler.add_replica(replica)
                        listener.replica_ready(info, len(pool.ready))
                    continue
                replica, work, tries = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    scheduler.replica_died(replica, cause(e))
                    for other in [r for r, (rep, _, _) in in_flight.items() if rep is replica]:
                        del in_flight[other]
                    pool.replace(replica)
                except ray.exceptions.RayError as e:
                    log.warning("shard %s attempt %d failed: %s", work.shard.name, tries, cause(e))
                    scheduler.failed(replica, work, cause(e))
                else:
                    scheduler.succeeded(replica, work)
                    listener.shard_done(work, result, tries)
                    if spec.cache is not None:  # committed: now its rows may enter the cache
                        publishing.append(replica.publish_cache.remote(result.attempt))
        _wait_for(publishing)
    finally:
        pool.stop()


class _ReplicaPool:
    """The replica actors: started, watched until their model loads, replaced when they die."""

    def __init__(self, spec: JobSpec, job_facts: dict, shards_per_replica: int):
        self.spec, self.job_facts, self.shards_per_replica = spec, job_facts, shards_per_replica
        self.ready: list = []  # replicas whose model has loaded
        self.starting: dict = {}  # info() ObjectRef -> replica still loading
        self.failed_starts = 0  # in a row, with no replica starting in between

    def _launch(self) -> None:
        import ray

        from workers.replica import Replica

        res = self.spec.resources
        actor = ray.remote(Replica).options(
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            max_restarts=0,
            max_task_retries=0,
            # A thread for each shard it holds (their rows share one engine;
            # one is read or written meanwhile) and one for info().
            max_concurrency=self.shards_per_replica + 1,
        )
        replica = actor.remote(self.spec, self.job_facts)
        self.starting[replica.info.remote()] = replica

    def start(self, count: int) -> None:
        for _ in range(count):
            self._launch()

    def started(self, ref) -> tuple[object | None, dict | None]:
        """A replica's start ended: (replica, info) when ready; else launch another, up to a limit."""
        import ray

        replica = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            self.failed_starts += 1
            if self.failed_starts >= self.spec.shards.max_attempts:
                raise ReplicasFailToStart(
                    f"replicas fail to start ({self.failed_starts} times in a row); last error: {cause(e)}"
                ) from None
            log.warning("a replica failed to start (%s); starting another", cause(e))
            self._launch()
            return None, None
        self.failed_starts = 0
        self.ready.append(replica)
        log.info("replica ready: %s", info)
        return replica, info

    def replace(self, dead) -> None:
        if dead in self.ready:
            self.ready.remove(dead)
            self._launch()

    def stop(self) -> None:
        import ray

        for replica in [*self.ready, *self.starting.values()]:
            ray.kill(replica, no_restart=True)
        self.ready, self.starting = [], {}


def _wait_for(publishing: list) -> None:
    """Let the replicas finish writing committed rows to the cache before they stop.
    A write that fails costs a later job a miss, never this job its result."""
    import ray

    ready, late = ray.wait(publishing, num_returns=len(publishing), timeout=PUBLISH_WAIT_S) if publishing else ([], [])
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            log.warning("a replica could not write its rows to the cache: %s", cause(e))
    if late:
        log.warning("%d shards' rows did not reach the cache within %.0f s", len(late), PUBLISH_WAIT_S)


def cause(error: Exception) -> str:
    """The innermost useful message of a Ray error."""
    cause_ = getattr(error, "cause", None)
    if cause_ is not None and cause_ is not error:
        return f"{type(cause_).__name__}: {cause_}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
