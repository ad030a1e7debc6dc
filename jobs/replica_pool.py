"""The replica actors of a run: launched, watched until their model loads,
replaced when they die, stopped at the end. A replica that fails to start is
started again, until shards.max_attempts fail in a row (ReplicasFailToStart).
"""

from __future__ import annotations

import logging

from jobs.core.spec import JobSpec
from jobs.scheduler import WRITING_PER_REPLICA

log = logging.getLogger(__name__)


class ReplicasFailToStart(RuntimeError):
    pass


class ReplicaPool:
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
            # A thread for each shard it holds, generating (their rows share one
            # engine) or past that, being written: the scheduler's hold; and one
            # for info() and publish_cache().
            max_concurrency=self.shards_per_replica + WRITING_PER_REPLICA + 1,
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


def cause(error: Exception) -> str:
    """The innermost useful message of a Ray error."""
    cause_ = getattr(error, "cause", None)
    if cause_ is not None and cause_ is not error:
        return f"{type(cause_).__name__}: {cause_}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
