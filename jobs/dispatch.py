"""The Ray plumbing of a run: start replicas, send them the scheduler's shards,
wait, and hand every outcome back. Which shard goes where and what a shard's
failure costs is jobs/scheduler.py's; what a committed shard means is the
listener's (the driver's).

The replicas' lifecycle is jobs/replica_pool.py's. What it decides itself:
a replica that dies is replaced at once, and a shard's rows go to the row
cache only after the listener has committed it, waited for (up to
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
from jobs.replica_pool import ReplicaPool, cause
from jobs.scheduler import ShardScheduler, Work

log = logging.getLogger(__name__)

WAIT_S = 1.0  # longest wait for an outcome before the listener's tick (heartbeat, cancel)
PUBLISH_WAIT_S = 300.0  # at the end, for the replicas' last writes to the row cache


class RunListener(Protocol):
    def tick(self) -> None:
        """Called at least every WAIT_S; may raise to stop the run (cancel)."""

    def replica_ready(self, info: dict, ready: int) -> None: ...

    def shard_done(self, work: Work, result: ShardResult, tries: int) -> None: ...


def run_shards(spec: JobSpec, scheduler: ShardScheduler, listener: RunListener, pool: ReplicaPool) -> None:
    """Run the scheduler's work on the pool's replicas (launched and configured by the
    driver) until it is done; stops them at the end. Raises ShardExhausted,
    ReplicasFailToStart, BadInput (a model a replica refuses), or whatever the listener
    raises.

    Replicas the cluster has no room for stay pending (an autoscaler's cue to
    add nodes) and join when placed and loaded."""
    import ray

    # memory:// lives in this process only: the rows travel through Ray instead.
    inline_input = storage.process_local(spec.input.uri, spec.input.storage_options)
    in_flight: dict = {}  # ObjectRef -> (replica, work, tries)
    publishing: list = []  # committed shards' rows on their way to the row cache
    try:
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
