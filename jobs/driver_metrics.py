"""The driver's metrics: job state, shards, replicas alive, and rows and tokens committed.

jobs/driver.py calls `job_state` where the job's state changes and `progress`
from its dispatch loop; both read the job record (and the scheduler), so a
row is counted when its shard commits, never for an attempt that is retried.
The series are defined in jobs/core/metrics.py. Nothing is recorded while
the driver is not connected to Ray (the records would be dropped); counts
made meanwhile are recorded once it is.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from jobs.core import metrics as m
from jobs.core.spec import JobSpec
from jobs.record import Counts, JobRecord, JobState

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # the dispatch loop ticks far more often; Ray exports every second at most

# A counter per field of the job's counts: the counter moves as the count grows.
COUNTERS = {
    "rows_done": m.ROWS_GENERATED,
    "rows_failed": m.ROWS_FAILED,
    "prompt_tokens": m.PROMPT_TOKENS,
    "completion_tokens": m.COMPLETION_TOKENS,
}


@dataclass
class _Job:
    """What this driver last recorded for one job."""

    name: str
    counted: dict[str, int] = field(default_factory=dict)  # the counts the counters already include
    next_progress: float = 0.0


_recorder: m.Recorder | None = None
_jobs: dict[str, _Job] = {}  # by job name: a process may run several jobs, one after another


def _never_raises(fn):
    """Metrics must never fail a job: a bug here is logged once, and the job goes on."""
    failed = False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal failed
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not failed:
                failed = True
                log.warning("recording metrics failed in %s; not reporting this again", fn.__name__, exc_info=True)

    return wrapper


@_never_raises
def job_state(spec: JobSpec, record: JobRecord) -> None:
    """The job moved to `record.state`: record the state now. Outside RUNNING no
    shard runs and no replica lives (the dispatch loop stops its replicas as it ends)."""
    recorder, job = _connected(spec, record.counts)
    if record.state is JobState.RUNNING:
        # A run counts from here (connected to Ray or not yet): earlier runs' rows are in the counts already.
        job.counted = _counts(record.counts)
    if recorder is None:
        return
    if record.state is not JobState.RUNNING:
        for series in (m.SHARDS_QUEUED, m.SHARDS_IN_FLIGHT, m.REPLICAS_ALIVE):
            recorder.set(series, 0, job_name=job.name)
    _record_job(recorder, job, record)


@_never_raises
def progress(spec: JobSpec, record: JobRecord, scheduler, force: bool = False) -> None:
    """Shards queued and in flight and replicas alive (from the ShardScheduler), and
    the counts; at most every PROGRESS_EVERY_S unless `force` (a commit)."""
    recorder, job = _connected(spec, record.counts)
    if recorder is None or (not force and time.monotonic() < job.next_progress):
        return
    job.next_progress = time.monotonic() + PROGRESS_EVERY_S
    if scheduler is not None:
        recorder.set(m.SHARDS_QUEUED, len(scheduler.queue), job_name=job.name)
        recorder.set(m.SHARDS_IN_FLIGHT, sum(len(w) for w in scheduler.in_flight.values()), job_name=job.name)
        recorder.set(m.REPLICAS_ALIVE, len(scheduler.in_flight), job_name=job.name)  # ready replicas, live ones
    _record_job(recorder, job, record)


def _record_job(recorder: m.Recorder, job: _Job, record: JobRecord) -> None:
    """The state (again: it may have changed before Ray was connected), shard totals, counters."""
    for state in JobState:
        recorder.set(m.JOB_STATE, 1 if state is record.state else 0, job_name=job.name, state=state.value)
    c = record.counts
    recorder.set(m.SHARDS_PLANNED, c.shards_total, job_name=job.name)
    recorder.set(m.SHARDS_COMMITTED, c.shards_committed, job_name=job.name)
    now = _counts(c)
    for key, series in COUNTERS.items():
        # A count can fall (retry-failed turns dead letters into rows): the counter just waits.
        recorder.inc(series, now[key] - job.counted.get(key, now[key]), job_name=job.name)
    job.counted = now


def _connected(spec: JobSpec, counts: Counts) -> tuple[m.Recorder | None, _Job]:
    """The recorder, or None while this process is not connected to Ray; and the job's view."""
    global _recorder
    import ray

    name = m.job_name(spec.name, spec.output.uri)
    job = _jobs.get(name)
    if job is None:
        job = _jobs[name] = _Job(name, _counts(counts))
    if not ray.is_initialized():
        return None, job
    if _recorder is None:
        from ray.util import metrics as ray_metrics

        _recorder = m.Recorder(ray_metrics)
    return _recorder, job


def _counts(counts: Counts) -> dict[str, int]:
    return {key: getattr(counts, key) for key in COUNTERS}
