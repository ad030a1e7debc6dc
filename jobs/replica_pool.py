"""The replica actors of a run: launched (while the driver still validates,
where the cluster has room), configured once the driver's checks pass,
watched until they are ready, replaced when they die, stopped at the end. A
replica that fails to start is started again, until shards.max_attempts fail
in a row (ReplicasFailToStart); one that refuses the model (ModelError) fails
the job as bad input at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobs.core.errors import BadInput
from jobs.core.spec import JobSpec
from jobs.core.times import now
from jobs.replica_plan import ReplicaPlan, replica_need, replicas_on
from jobs.scheduler import WRITING_PER_REPLICA

log = logging.getLogger(__name__)


class ReplicasFailToStart(RuntimeError):
    pass


class ReplicaPool:
    """The replica actors: launched, configured, watched until ready, replaced when they die.

    A replica loads its engine from the spec alone as it is launched; it gets
    the job's facts (`configure`) only once the driver has validated the job,
    and only a configured replica is ready for shards."""

    def __init__(self, spec: JobSpec, shards_per_replica: int):
        self.spec, self.shards_per_replica = spec, shards_per_replica
        self.job_facts: dict | None = None  # set by configure; replicas launched after it are configured at once
        self.launched: list = []  # launched before configure: loading, not yet told the job's facts
        self.ready: list = []  # replicas whose model has loaded and whose stages are built
        self.starting: dict = {}  # configure() ObjectRef -> replica still loading
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
            # for configure() and publish_cache().
            max_concurrency=self.shards_per_replica + WRITING_PER_REPLICA + 1,
        )
        replica = actor.remote(self.spec)
        if self.job_facts is None:
            self.launched.append(replica)
        else:
            self._configure(replica)

    def _configure(self, replica) -> None:
        self.starting[replica.configure.remote(self.job_facts)] = replica

    def start(self, count: int) -> None:
        for _ in range(count):
            self._launch()

    def configure(self, job_facts: dict) -> None:
        """The driver's checks passed: every replica launched so far (and any launched later) gets the job's facts."""
        self.job_facts = job_facts
        for replica in self.launched:
            self._configure(replica)
        self.launched = []

    def started(self, ref) -> tuple[object | None, dict | None]:
        """A replica's start ended: (replica, info) when ready; else launch another, up to a limit.
        A model the replica refuses is the job's bad input: that error, raised as itself."""
        import ray

        replica = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            if isinstance(getattr(e, "cause", None), BadInput):  # the same model fails every replica
                raise e.cause from None
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

        for replica in [*self.ready, *self.starting.values(), *self.launched]:
            ray.kill(replica, no_restart=True)
        self.ready, self.starting, self.launched = [], {}, []


class EarlyLaunch:
    """The replicas launched on a thread as soon as Ray is up, while the driver still validates.

    Only where that costs nobody else: on a Ray this run started, or on a cluster
    whose free resources hold every replica now (an autoscaler would otherwise add
    nodes for a job that may yet be refused). The security checks
    (jobs/validate.py check_before_launch) have passed before this is made."""

    def __init__(self, pool: ReplicaPool, ray_ready: Callable[[], bool], plan: Callable[[], ReplicaPlan]):
        """`ray_ready`: waits for Ray, returns whether this run started it; `plan`: the replica plan on it."""
        self.pool = pool
        self.plan: ReplicaPlan | None = None
        self.launched_at: str | None = None  # when the replicas were asked for, if early
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._launch, args=(ray_ready, plan), name="early-launch", daemon=True)
        self._thread.start()

    def _launch(self, ray_ready, plan) -> None:
        try:
            started_ray = ray_ready()
            self.plan = plan()
            if not self._stopped.is_set() and (started_ray or _room_now(self.pool.spec, self.plan.launch)):
                self.pool.start(self.plan.launch)
                self.launched_at = now()
        except BaseException as e:  # the driver's result() raises it, once validation has passed
            self._error = e

    def result(self) -> ReplicaPlan:
        """Wait for Ray and the launch; the plan (its replicas launched, or not, if there was no room).
        Raises what starting Ray or planning raised."""
        while self._thread.is_alive():
            self._thread.join(0.1)  # a short wait at a time: Ctrl-C reaches the main thread meanwhile
        if self._error is not None:
            raise self._error
        return self.plan

    def stop(self, wait_s: float) -> None:
        """The run ends before dispatch: launch nothing more, and stop what was launched."""
        self._stopped.set()
        self._thread.join(wait_s)
        if self.launched_at is not None:
            self.pool.stop()


def _room_now(spec: JobSpec, replicas: int) -> bool:
    """Whether the cluster's free resources hold `replicas` replicas now. Summed over the
    nodes, so it may say yes where no single node has room for the last one: that
    replica then waits for room, as it would have after validation."""
    import ray

    return replicas_on(ray.available_resources(), replica_need(spec.resources)) >= replicas


def cause(error: Exception) -> str:
    """The innermost useful message of a Ray error."""
    cause_ = getattr(error, "cause", None)
    if cause_ is not None and cause_ is not error:
        return f"{type(cause_).__name__}: {cause_}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
