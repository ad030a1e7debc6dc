"""The driver: validate, plan, dispatch shards to replicas, commit, finalize.

The driver never holds rows: it reads footers to plan, sends replicas shard
descriptors, and commits the files they stage (jobs/output.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass

from jobs import preflight
from jobs.dataset import check_unique_ids, open_dataset
from jobs.output import OutputDir
from jobs.plan import Shard, plan
from jobs.record import JobRecord, library_versions, now
from jobs.spec import JobSpec
from workers.replica import read_shard_rows
from workers.storage import process_local, write_bytes

log = logging.getLogger(__name__)

RECORD = "_job.json"
CANCEL_MARKER = "_CANCEL"
IN_FLIGHT_PER_REPLICA = 2  # the next shard waits at the replica, so it never idles between shards
RECORD_EVERY_S = 1.0  # at most this often on commits
HEARTBEAT_S = 10.0  # the record is rewritten at least this often while running
CANCEL_POLL_S = 2.0


class JobError(RuntimeError):
    """The job ran and failed; committed shards are kept and the job can be resumed."""


class OutputConflict(ValueError):
    """The output holds another job's committed results."""


class JobCancelled(RuntimeError):
    """The job was cancelled; committed shards are kept and the job can be resumed."""


@dataclass(frozen=True)
class Validated:
    shards: list[Shard]
    input_rows: int
    model: dict


def validate(spec: JobSpec) -> Validated:
    """Every check that needs no replica: input files and schema, ids, model files, tokenizer."""
    dataset = open_dataset(spec.input)
    check_unique_ids(spec.input, dataset)
    preflight.check_model_source(spec)
    preflight.check_model_loadable(spec)
    preflight.check_tokenizer(spec, preflight.load_tokenizer(spec))
    shards = plan(dataset.files, spec.shards.rows_per_shard)
    return Validated(shards, dataset.num_rows, preflight.model_identity(spec))


def claim_output(spec: JobSpec, overwrite: bool) -> tuple[OutputDir, JobRecord]:
    """Open the output for this spec: resume its own record, or refuse another job's results."""
    out = OutputDir(spec.output.uri, spec.output.storage_options)
    existing = out.read_json(RECORD)
    if existing and existing.get("state") == "running" and driver_alive(existing):
        run = existing["runs"][-1]
        raise OutputConflict(
            f"{out.uri} is being written by a running driver (pid {run.get('pid')} on {run.get('host')}, "
            f"record updated {existing.get('updated_at')}); `bulkgen cancel` it or wait for it"
        )
    if existing and existing.get("fingerprint") != spec.fingerprint():
        committed = out.commit_records()
        if overwrite:
            log.warning("--overwrite: deleting the previous job's output in %s", out.uri)
            out.wipe()
        elif committed:
            raise OutputConflict(
                f"{out.uri} holds {len(committed)} committed shards of a different job spec "
                f"(fingerprint {existing.get('fingerprint')}, this spec is {spec.fingerprint()}); "
                "use another output.uri, or --overwrite to delete them"
            )
        else:
            out.wipe()  # nothing committed to lose (e.g. an earlier spec failed validation)
        existing = None
    elif not existing and not out.is_empty() and not overwrite:
        raise OutputConflict(f"{out.uri} is not empty and was not written by bulkgen; use another output.uri")
    if existing:
        record = JobRecord.from_json(existing)
    else:
        record = JobRecord(spec.redacted(), spec.fingerprint(), spec.name)  # state pending
        out.write_json(RECORD, record.to_json())  # claims the output for this spec
    out.remove(CANCEL_MARKER)
    return out, record


def run_job(
    spec: JobSpec,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    retry_failed: bool = False,
) -> JobRecord:
    """Run (or resume) a job to its end; returns the final record.

    With `retry_failed`, committed shards that have dead letters are generated
    again too. Raises the validation error, JobError, JobCancelled or OutputConflict."""
    out, record = claim_output(spec, overwrite)
    if retry_failed:
        if record.state == "running":
            raise ValueError(
                f"the job in {out.uri} is running; wait for it (if its driver is dead, `bulkgen resume` it first)"
            )
        if process_local(spec.output.uri, spec.output.storage_options):
            raise ValueError("retry-failed needs output storage that Ray workers can reach, not memory://")
        out.remove("_SUCCESS")  # the output is about to change
    record.start_run(address)
    record.set_state("validating")
    out.write_json(RECORD, record.to_json())
    try:
        checked = validate(spec)
    except Exception as e:
        record.set_state("failed", {"message": str(e), "where": "validating"})
        out.write_json(RECORD, record.to_json())
        raise
    record.model = checked.model
    run = _Run(spec, out, record, checked, address, progress)
    return run.execute(retry_failed)


class _Run:
    """One driver run of a job: owns the replicas and the commit loop."""

    def __init__(self, spec: JobSpec, out: OutputDir, record: JobRecord, checked: Validated, address, progress):
        self.spec, self.out, self.record, self.address = spec, out, record, address
        self.shards = checked.shards
        self.show_progress = progress
        n = spec.generation.num_return_sequences
        c = record.counts
        c.input_rows, c.rows_total, c.shards_total = checked.input_rows, checked.input_rows * n, len(self.shards)
        self.file_metadata = {"bulkgen": json.dumps(self._job_facts(), sort_keys=True)}
        self.commits = out.commit_records()
        self._recount()
        self._last_record_write = 0.0

    def _job_facts(self) -> dict:
        return {
            "fingerprint": self.spec.fingerprint(),
            "name": self.spec.name,
            "model": self.record.model,
            "generation": self.spec.generation.model_dump(mode="json"),
            "versions": library_versions(),
        }

    def _recount(self) -> None:
        c = self.record.counts
        c.shards_committed = len(self.commits)
        c.rows_done = sum(r["rows_done"] for r in self.commits.values())
        c.rows_failed = sum(r["rows_failed"] for r in self.commits.values())
        c.prompt_tokens = sum(r["prompt_tokens"] for r in self.commits.values())
        c.completion_tokens = sum(r["completion_tokens"] for r in self.commits.values())

    def _write_record(self, force: bool = True, every: float = RECORD_EVERY_S) -> None:
        if force or time.monotonic() - self._last_record_write >= every:
            self.record.updated_at = now()
            self.out.write_json(RECORD, self.record.to_json())
            self._last_record_write = time.monotonic()

    def execute(self, retry_failed: bool = False) -> JobRecord:
        todo = [(s, "process") for s in self.shards if s.index not in self.commits]
        if retry_failed:
            todo += [(s, "retry_failed") for s in self.shards if (self.commits.get(s.index) or {}).get("errors")]
        self.record.set_state("running")
        self._write_record()
        log.info("%d shards, %d committed earlier, %d to run", len(self.shards), len(self.commits), len(todo))
        try:
            if todo:
                self._dispatch(todo)
        except JobCancelled:
            self.record.set_state("cancelled", {"message": "cancelled by the user", "where": "running"})
            self._write_record()
            raise
        except KeyboardInterrupt:
            self.record.set_state("cancelled", {"message": "interrupted (Ctrl-C)", "where": "running"})
            self._write_record()
            raise JobCancelled("interrupted; committed shards are kept, resume with `bulkgen resume`") from None
        except JobError as e:
            self.record.set_state("failed", {"message": str(e), "where": "running"})
            self._write_record()
            raise
        except Exception as e:  # storage gone for good, a bug: still leave a true record
            self.record.set_state("failed", {"message": f"{type(e).__name__}: {e}", "where": "driver"})
            self._write_record()
            raise
        return self._finalize()

    def _finalize(self) -> JobRecord:
        self.record.set_state("finalizing")
        self._write_record()
        c = self.record.counts
        failed_fraction = c.rows_failed / c.rows_total if c.rows_total else 0.0
        if failed_fraction > self.spec.shards.max_failed_fraction:
            message = (
                f"{c.rows_failed} of {c.rows_total} rows failed ({failed_fraction:.2%}), over the error budget "
                f"shards.max_failed_fraction={self.spec.shards.max_failed_fraction}; see {self.out.url('errors')}/"
            )
            self.record.set_state("failed", {"message": message, "where": "finalizing"})
            self._write_record()
            raise JobError(message)
        manifest = {
            "fingerprint": self.spec.fingerprint(),
            "shards": [self.commits[i] for i in sorted(self.commits)],
            "rows_done": c.rows_done,
            "rows_failed": c.rows_failed,
        }
        self.out.write_json("_manifest.json", manifest)
        self.out.remove("_staging")
        self.record.set_state("succeeded")
        self.record.runs[-1]["finished_at"] = time.time()
        self._write_record()
        self.out.write_json("_SUCCESS", {"finished_at": self.record.finished_at})
        return self.record

    # -- dispatch ------------------------------------------------------------------

    def _dispatch(self, todo: list[tuple[Shard, str]]) -> None:
        """Run `todo` (shard, replica method) on the replicas until all are committed."""
        import ray

        from jobs.cluster import connect

        started_ray = connect(self.address)
        pool = _ReplicaPool(self.spec, self.file_metadata)
        queue: deque[tuple[Shard, str]] = deque(todo)
        # memory:// lives in this process only: rows and files travel through Ray instead.
        inline_input = process_local(self.spec.input.uri, self.spec.input.storage_options)
        attempts: Counter[int] = Counter()  # failures charged to each shard
        tries: Counter[int] = Counter()  # dispatches of each shard
        suspects: set[int] = set()  # shards in flight on a replica that died
        in_flight: dict = {}  # ObjectRef -> (replica, shard, method)
        bar = _progress(self.record, self.show_progress)
        tokens_before = self.record.counts.completion_tokens
        next_cancel_poll = 0.0
        try:
            pool.start(self.spec.resources.replicas)
            while queue or in_flight:
                self._write_record(force=False, every=HEARTBEAT_S)
                if time.monotonic() >= next_cancel_poll:
                    if self.out.exists(CANCEL_MARKER):
                        raise JobCancelled(f"cancelled through {self.out.url(CANCEL_MARKER)}")
                    next_cancel_poll = time.monotonic() + CANCEL_POLL_S
                # Only replicas whose model has loaded get work: a replacement that
                # waits for resources must not sit on shards a live replica could run.
                for replica, depth in _offers(pool, queue):
                    while pool.load[replica] < depth and (item := _next_for(replica, queue, pool, suspects)):
                        shard, method = item
                        tries[shard.index] += 1
                        attempt = f"attempt-{tries[shard.index]}-{uuid.uuid4().hex[:8]}"
                        if method == "process":
                            rows = read_shard_rows(self.spec, shard) if inline_input else None
                            ref = replica.process.remote(shard, attempt, rows)
                        else:
                            ref = replica.retry_failed.remote(shard, attempt)
                        in_flight[ref] = (replica, shard, method)
                        pool.load[replica] += 1
                        if shard.index in suspects:
                            pool.solo.add(replica)
                done, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in pool.starting:
                        info = pool.started(ref)
                        run = self.record.runs[-1]
                        if info and "replica" not in self.record.model:
                            self.record.model["replica"] = info
                            # Where steady-state throughput starts: after cluster and model start-up.
                            run["first_replica_ready_at"] = time.time()
                        if len(pool.ready) == self.spec.resources.replicas and "all_replicas_ready_at" not in run:
                            run["all_replicas_ready_at"] = time.time()
                        continue
                    replica, shard, method = in_flight.pop(ref)
                    pool.load[replica] -= 1
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        if replica in pool.solo or shard.index in suspects:
                            # It ran alone on that replica: its own fault (or its node's).
                            # It stays a suspect, so it keeps running alone.
                            self._retry(shard, method, attempts, queue, f"replica died: {_cause(e)}")
                        else:
                            # Which of the replica's shards killed it is unknown: each
                            # runs alone next, and only a death while alone is charged.
                            suspects.add(shard.index)
                            self.record.counts.shards_retried += 1
                            queue.appendleft((shard, method))
                        pool.replace(replica)
                    except ray.exceptions.RayError as e:
                        self._retry(shard, method, attempts, queue, _cause(e))
                    else:
                        suspects.discard(shard.index)
                        self._commit(shard, result, tries[shard.index])
                        bar.update(result.samples_ok + result.samples_failed)
                        bar.set_postfix_str(_rate(self.record.counts.completion_tokens - tokens_before, bar), refresh=False)
        finally:
            bar.close()
            pool.stop()
            if started_ray:
                ray.shutdown()

    def _retry(self, shard: Shard, method: str, attempts: Counter, queue: deque, error: str) -> None:
        attempts[shard.index] += 1
        self.record.counts.shards_retried += 1
        if attempts[shard.index] >= self.spec.shards.max_attempts:
            raise JobError(
                f"shard {shard.name} ({shard.url} rows {shard.start}:{shard.stop}) failed "
                f"{attempts[shard.index]} times (shards.max_attempts); last error: {error}. "
                f"{len(self.commits)} committed shards are kept; fix the cause and resume"
            )
        log.warning("shard %s attempt %d failed, retrying: %s", shard.name, attempts[shard.index], error)
        queue.append((shard, method))  # last: the healthy shards first
        self._write_record(force=False)

    def _commit(self, shard: Shard, result, tries: int) -> None:
        for url, data in (result.inline_files or {}).items():
            write_bytes(url, data, self.spec.output.storage_options)
        extra = {"input": shard.url, "input_start": shard.start, "input_stop": shard.stop, "attempts": tries}
        self.commits[shard.index] = self.out.commit(result, extra)
        self._recount()
        self._write_record(force=False)
        log.info("committed %s: %d rows, %d failed, %.1fs", shard.name, result.samples_ok, result.samples_failed, result.seconds)


class _ReplicaPool:
    """The replica actors: started, watched until their model loads, replaced when they die."""

    def __init__(self, spec: JobSpec, file_metadata: dict):
        self.spec, self.file_metadata = spec, file_metadata
        self.ready: list = []  # replicas whose model has loaded
        self.starting: dict = {}  # info() ObjectRef -> replica still loading
        self.load: Counter = Counter()  # shards in flight per replica
        self.solo: set = set()  # replicas running a suspect shard, alone
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
            # Threads for the shards in flight (one reads or writes while one
            # generates) and one for info().
            max_concurrency=IN_FLIGHT_PER_REPLICA + 1,
        )
        replica = actor.remote(self.spec, self.file_metadata)
        self.starting[replica.info.remote()] = replica

    def start(self, count: int) -> None:
        for _ in range(count):
            self._launch()

    def started(self, ref) -> dict | None:
        """Handle a replica's start: ready, or failed (then launch another, up to a limit)."""
        import ray

        replica = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            self.failed_starts += 1
            if self.failed_starts >= self.spec.shards.max_attempts:
                raise JobError(
                    f"replicas fail to start ({self.failed_starts} times in a row); last error: {_cause(e)}"
                ) from None
            log.warning("a replica failed to start (%s); starting another", _cause(e))
            self._launch()
            return None
        self.failed_starts = 0
        self.ready.append(replica)
        log.info("replica ready: %s", info)
        return info

    def replace(self, dead) -> None:
        if dead in self.ready:
            self.ready.remove(dead)
            self.load.pop(dead, None)
            self.solo.discard(dead)
            self._launch()

    def stop(self) -> None:
        import ray

        for replica in [*self.ready, *self.starting.values()]:
            ray.kill(replica, no_restart=True)
        self.ready, self.starting = [], {}


def _offers(pool: _ReplicaPool, queue: deque):
    """(replica, how many shards it may hold): first one shard for every replica,
    then a second (to overlap its I/O with generation) only while the queue
    still has a shard for every replica, so the last shards go to whichever
    replica frees up first instead of waiting behind a busy one."""
    for depth in range(1, IN_FLIGHT_PER_REPLICA + 1):
        for replica in list(pool.ready):
            if depth > 1 and len(queue) <= len(pool.ready):
                return
            yield replica, depth


def _next_for(replica, queue: deque, pool: _ReplicaPool, suspects: set[int]) -> tuple[Shard, str] | None:
    """The next queued shard for `replica`, if it should take one now.

    A suspect shard (it was in flight when a replica died) runs only on an
    idle replica and alone, so a shard that kills replicas is found out
    without charging the shards that happened to share its replica."""
    if pool.load[replica] >= IN_FLIGHT_PER_REPLICA or replica in pool.solo and pool.load[replica]:
        return None
    pool.solo.discard(replica)
    for i, (shard, method) in enumerate(queue):
        if shard.index not in suspects or pool.load[replica] == 0:
            del queue[i]
            return shard, method
    return None


def _cause(error: Exception) -> str:
    """The innermost useful message of a Ray error."""
    cause = getattr(error, "cause", None)
    if cause is not None and cause is not error:
        return f"{type(cause).__name__}: {cause}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _progress(record: JobRecord, enabled: bool):
    from tqdm import tqdm

    c = record.counts
    return tqdm(
        total=c.rows_total,
        initial=c.rows_done + c.rows_failed,
        unit="row",
        desc=record.name or "bulkgen",
        disable=None if enabled else True,  # None: only on a terminal
        dynamic_ncols=True,
    )


def _rate(tokens: int, bar) -> str:
    elapsed = bar.format_dict.get("elapsed") or 0
    return f"{tokens / elapsed:,.0f} tok/s" if elapsed else ""


def driver_alive(doc: dict) -> bool:
    """Whether the driver of a record that says running is still alive: by pid on
    this host, elsewhere by a heartbeat younger than a few HEARTBEAT_S."""
    import os
    import socket
    from datetime import datetime, timezone

    run = (doc.get("runs") or [{}])[-1]
    if run.get("host") == socket.gethostname() and run.get("pid"):
        try:
            os.kill(run["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return run["pid"] != os.getpid()
    updated = datetime.fromisoformat(doc.get("updated_at", "1970-01-01T00:00:00+00:00"))
    return (datetime.now(timezone.utc) - updated).total_seconds() < 6 * HEARTBEAT_S


def resume_spec(output_uri: str, overrides: list[str] = ()) -> JobSpec:
    """The spec recorded in an output's _job.json, ready to run again.

    Storage option values were redacted when recorded; credentials come from
    the environment (or `overrides`, e.g. input.storage_options.key=...)."""
    from jobs.spec import apply_overrides, spec_from_dict

    doc = OutputDir(output_uri, {}).read_json(RECORD)
    if doc is None:
        raise FileNotFoundError(f"no job record ({RECORD}) under {output_uri}; nothing to resume")
    data = doc["spec"]
    for section in ("input", "output"):
        data[section]["storage_options"] = {}
    return spec_from_dict(apply_overrides(data, list(overrides)), source=f"{output_uri}/{RECORD}")


def request_cancel(output_uri: str) -> None:
    out = OutputDir(output_uri, {})
    doc = out.read_json(RECORD)
    if doc is None:
        raise FileNotFoundError(f"no job record ({RECORD}) under {output_uri}")
    if doc.get("state") in ("succeeded", "failed", "cancelled"):
        raise ValueError(f"the job in {output_uri} is already {doc['state']}")
    out.write_json(CANCEL_MARKER, {"requested_at": now()})
