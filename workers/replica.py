"""A model replica: loads its engine once, then turns shard tasks into staged output files.

A plain class; the driver wraps it with `ray.remote` where it launches it,
which may be while it is still validating the job: `__init__` loads the engine
from the spec alone, and `configure` (once the driver's checks pass) builds
the stages, which need what validation found (the job's facts). Rows travel
storage -> replica -> storage; only counts go back. The work on a shard is a
list of stages chosen once from the spec (workers/stages/). `run` reports
twice (a Ray streaming generator): when the shard's rows leave the engine, so
the driver sends the next shard while this one is written, and with the
staged files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from jobs.core import faults
from jobs.core.errors import BadInput
from jobs.core.metrics import job_name
from jobs.core.protocol import ShardProgress, ShardResult, ShardTask
from jobs.core.spec import JobSpec
from jobs.core.times import now
from workers.engine_factory import create_engine
from workers.engine_loop import EngineLoop
from workers.stages import build_stages
from workers.stages.generate import Generate
from workers.stages.work import ShardWork


class Replica:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.stages = None  # built by configure
        # A model this replica refuses (ModelError) is the job's bad input: kept for configure to
        # raise, so that the driver gets it as itself (a constructor's error reaches the driver
        # only as the actor's death, as text).
        self.refused: BadInput | None = None
        try:
            faults.inject("replica.start")
            self.loop = EngineLoop(lambda: create_engine(spec), job_name(spec.name, spec.output.uri), spec.resources.batch_size)
        except BadInput as e:
            self.refused = e
            return
        self.described = self.loop.engine.describe()
        self.loaded_at = now()

    def configure(self, job_facts: dict) -> dict:
        """The driver's checks passed: build the stages from `job_facts` (the model identity and
        versions every file's metadata and the cache key hold); returns info()."""
        if self.refused is not None:
            raise self.refused
        self.stages = build_stages(self.spec, self.loop, job_facts, self.described)
        return self.info()

    def info(self) -> dict:
        """Facts about this replica for the job record (and for tests: its pid)."""
        return {"pid": os.getpid(), **self.described}

    def publish_cache(self, attempt: str) -> int:
        """The driver committed this attempt: write its generated sequences to the row cache."""
        return self.stages.publish(attempt)

    def run(self, task: ShardTask) -> Iterator[ShardProgress | ShardResult]:
        """Generate one shard attempt and stage its files under _staging/: yields a ShardProgress
        once the generate stage returns, then the ShardResult."""
        if self.stages is None:
            raise RuntimeError("Replica.run before configure: the driver sends shards only to configured replicas")
        faults.inject("replica.shard_start", shard=task.shard.index, attempt=task.attempt)
        started = time.perf_counter()
        work = ShardWork(task)
        for stage in self.stages.for_task(task.kind):
            work = stage.run(work)
            if isinstance(stage, Generate):
                yield ShardProgress(task.shard.index, task.attempt, self.loop.sequences_left())
                faults.inject("replica.after_generate", shard=task.shard.index, attempt=task.attempt)
        result = ShardResult(
            shard=task.shard.index,
            attempt=task.attempt,
            tally=work.tally,
            seconds=time.perf_counter() - started,
            staged=work.staged,
            replica={"pid": os.getpid(), "loaded_at": self.loaded_at, **self.stages.stats()},
            inline_files=work.inline_files,
        )
        faults.inject("replica.shard_end", shard=task.shard.index, attempt=task.attempt)
        yield result
