"""The Ray plumbing of a run: start replicas, send them the scheduler's shards,
wait, and hand every outcome back. Which shard goes where and what a shard's
failure costs is jobs/scheduler.py's; what a committed shard means is the
listener's (the driver's).

A shard attempt is a Ray streaming generator (workers/replica.py's
Replica.run): first a ShardProgress when its rows leave the engine, which
frees the replica for its next shard (scheduler.generated), then the
ShardResult. Only a result is committed; a replica that dies in either phase
loses the shard back to the queue. On a result the replica gets its next
shards before the listener commits this one (on its own thread).

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
from jobs.core.protocol import ShardProgress, ShardResult, ShardTask
from jobs.core.rows import read_shard_rows
from jobs.core.spec import JobSpec
from jobs.replica_pool import ReplicaPool, cause
from jobs.scheduler import ShardScheduler, Work

log = logging.getLogger(__name__)

WAIT_S = 1.0  # longest wait for an outcome before the listener's tick (heartbeat, cancel)
PUBLISH_WAIT_S = 300.0  # at the end, for the replicas' last writes to the row cache


class RunListener(Protocol):
    def tick(self) -> None:
        """Called at least every WAIT_S; may raise to stop the run (cancel, a commit's failure)."""

    def replica_ready(self, info: dict, ready: int) -> None: ...

    def shard_done(self, work: Work, result: ShardResult, tries: int) -> None:
        """Commit the shard; may return before the commit is done (committed() says when)."""

    def committed(self) -> list[ShardResult]:
        """The shards committed since the last call; raises a commit's failure."""

    def finish(self) -> None:
        """Wait until every shard handed over is committed; raises a commit's failure."""

    def close(self) -> None:
        """The run ended, maybe early: commit nothing more."""


def run_shards(spec: JobSpec, scheduler: ShardScheduler, listener: RunListener, pool: ReplicaPool) -> None:
    """Run the scheduler's work on the pool's replicas (launched and configured by the
    driver) until it is done and committed; stops them at the end. Raises
    ShardExhausted, ReplicasFailToStart, BadInput (a model a replica refuses), or
    whatever the listener raises.

    Replicas the cluster has no room for stay pending (an autoscaler's cue to
    add nodes) and join when placed and loaded."""
    import ray

    # memory:// lives in this process only: the rows travel through Ray instead.
    inline_input = storage.process_local(spec.input.uri, spec.input.storage_options)
    in_flight: dict = {}  # ObjectRefGenerator -> (replica, work, tries)
    uncommitted: dict = {}  # attempt -> its replica, for the row cache once the attempt is committed
    publishing: list = []  # committed shards' rows on their way to the row cache

    def start(assigned: list) -> None:
        for replica, work, tries in assigned:
            attempt = f"attempt-{tries}-{uuid.uuid4().hex[:8]}"
            rows = read_shard_rows(spec, work.shard) if inline_input else None
            task = ShardTask(work.shard, attempt, work.kind, rows)
            in_flight[replica.run.options(num_returns="streaming").remote(task)] = (replica, work, tries)

    def publish(committed: list[ShardResult]) -> None:
        for result in committed:
            if (replica := uncommitted.pop(result.attempt, None)) is not None:
                publishing.append(replica.publish_cache.remote(result.attempt))

    try:
        while not scheduler.done():
            listener.tick()
            publish(listener.committed())
            start(scheduler.assign())
            done, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=WAIT_S)
            for ref in done:
                if ref in pool.starting:
                    replica, info = pool.started(ref)
                    if replica is not None:
                        scheduler.add_replica(replica)
                        listener.replica_ready(info, len(pool.ready))
                    continue
                replica, work, tries = in_flight[ref]
                try:
                    # Ready: its next item is there (a dead actor's or a raised error's too).
                    outcome = ray.get(next(ref))
                except ray.exceptions.RayActorError as e:
                    scheduler.replica_died(replica, cause(e))
                    for other in [r for r, (rep, _, _) in in_flight.items() if rep is replica]:
                        del in_flight[other]
                    pool.replace(replica)
                except ray.exceptions.RayError as e:
                    del in_flight[ref]
                    log.warning("shard %s attempt %d failed: %s", work.shard.name, tries, cause(e))
                    scheduler.failed(replica, work, cause(e))
                else:
                    if isinstance(outcome, ShardProgress):  # its engine has room: the loop assigns next
                        log.debug("%s left its engine; %d sequences left", work.shard.name, outcome.sequences_left)
                        scheduler.generated(replica, work)
                        continue
                    del in_flight[ref]
                    scheduler.succeeded(replica, work)
                    start(scheduler.assign())  # before the commit: it may take a second on object stores
                    listener.shard_done(work, outcome, tries)
                    if spec.cache is not None:  # its rows enter the cache once it is committed
                        uncommitted[outcome.attempt] = replica
        listener.finish()
        publish(listener.committed())
        _wait_for(publishing)
    finally:
        listener.close()
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
