"""The driver: one run's life, told in order, each step done by its own module.

    claim the output            jobs/output.py open_output, jobs/claim.py
    validate input and model    jobs/validate.py check_before_launch, check_input_and_model
      beside it: join Ray,      jobs/ray_connection.py connect_async, jobs/replica_plan.py
      plan and launch replicas  jobs/replica_pool.py EarlyLaunch
    plan (or re-read the plan)  jobs/snapshot.py, jobs/core/plan.py
    configure the replicas      jobs/replica_pool.py
    dispatch shards             jobs/dispatch.py, jobs/scheduler.py
    commit each done shard      jobs/commit_listener.py
    finalize                    jobs/finalize.py
    report, beside ray.shutdown jobs/report/

Start-up runs in parallel: Ray starts and the replicas load their model while
the driver validates (the security checks come first); the replicas get the
job's facts, and the record says running, only once every check has passed,
so a job is still refused before any shard runs. Rows go from storage to the
replicas and back; the driver reads Parquet footers only. This module decides
nothing beyond the order of the steps and what state the record is left in
when one of them raises. The record's run.timeline says when each step ended.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from jobs import dispatch, driver_metrics
from jobs.claim import ClaimLost, OutputClaim
from jobs.commit_listener import CommitListener, count_committed
from jobs.core import faults, storage
from jobs.core.errors import BadInput, InputChanged, OutputError
from jobs.core.layout import BATCH_ERRORS, BATCH_OUTPUT, RECORD, SUCCESS
from jobs.core.plan import Shard, plan_digest, rows_per_shard
from jobs.core.protocol import CommitRecord, TaskKind
from jobs.core.spec import JobSpec, apply_overrides, spec_from_dict
from jobs.dataset import open_dataset, pin_input, plan_shards
from jobs.dedupe_index import start_dedupe_index
from jobs.finalize import finalize
from jobs.output import (
    OutputDir,
    check_commits_match_plan,
    input_changed_message,
    input_changes,
    open_output,
    read_record,
)
from jobs.ray_connection import CLOSE_WAIT_S, RayStart, connect_async
from jobs.record import JobFailure, JobRecord, JobState, RecordKeeper, library_versions
from jobs.replica_plan import plan_for_cluster
from jobs.replica_pool import EarlyLaunch, ReplicaPool, ReplicasFailToStart
from jobs.run_errors import JobCancelled, JobError
from jobs.run_log import RunLog
from jobs.scheduler import ShardExhausted, ShardScheduler, Work, shards_per_batch, shards_per_replica
from jobs.snapshot import InputSnapshot
from jobs.validate import (
    Checked,
    check_before_launch,
    check_input_and_model,
    check_output_usable,
    replicas_check_the_model,
)

log = logging.getLogger(__name__)

REPORT_WAIT_S = 30.0  # how long `bulkgen run` waits for the report once the job has ended


def run_job(
    spec: JobSpec,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    retry_failed: bool = False,
    started_at: str | None = None,
) -> JobRecord:
    """Run (or resume) a job to its end; returns the final record.

    With `retry_failed`, committed shards that have dead letters are generated
    again too. `started_at`: when the process started (the timeline's first
    moment; default now). Raises BadInput (before any shard runs), JobError or
    JobCancelled."""
    check_output_usable(spec)
    out, claim, record = open_output(spec, overwrite)  # refused before anything is written, or ours alone
    try:
        return _run_claimed(spec, out, claim, record, address, progress, retry_failed, started_at)
    finally:
        claim.release()


def _run_claimed(
    spec: JobSpec, out: OutputDir, claim: OutputClaim, record: JobRecord, address, progress, retry_failed, started_at
) -> JobRecord:
    if retry_failed:
        if storage.process_local(out.uri, out.storage_options):
            raise OutputError("retry-failed needs output storage that Ray workers can reach, not memory://")
        for name in (BATCH_OUTPUT, BATCH_ERRORS):  # the output is about to change
            out.remove(name)
    # _SUCCESS stands only beside a record that says succeeded: a re-run of a finished job
    # that is killed before it finalizes again must not leave one beside "validating".
    out.remove(SUCCESS)
    keeper = RecordKeeper(out, record, on_state=lambda r: driver_metrics.job_state(spec, r))
    record.start_run(address, claim.number, started_at)
    with RunLog(out.uri, out.storage_options, len(record.runs)) as run_log:
        log.info("run %d of %s (%s) into %s", len(record.runs), spec.name or "job", spec.fingerprint(), out.uri)
        run_log.copy()  # the log exists from the start, even if this driver is killed
        keeper.move_to(JobState.VALIDATING)
        ray_start = connect_async(address)  # Ray starts beside the checks
        launch = None
        try:
            check_before_launch(spec)  # before any process loads the model
            dataset = open_dataset(spec.input)
            pool = ReplicaPool(spec, _shards_per_replica(spec, record, dataset.num_rows))
            launch = EarlyLaunch(pool, ray_start.result, lambda: plan_for_cluster(spec.resources))
            faults.inject("driver.validate")
            checked = check_input_and_model(spec, dataset, replicas_check_the_model(spec, address))
            record.run.mark("validated")
            snapshot, shards = _planned_input(spec, out, record, checked)
            commits = out.commit_records()
            check_commits_match_plan(out, commits, shards)
            record.run.mark("planned")
        except KeyboardInterrupt:
            _abandon(ray_start, launch)
            raise _interrupted(keeper, "validating") from None
        except BaseException as e:  # bad input, a bug, or storage gone: the record says which
            _abandon(ray_start, launch)
            keeper.fail(str(e) if isinstance(e, BadInput) else f"{type(e).__name__}: {e}")
            log.error("validation failed: %s", e)
            raise
        record.model = checked.model
        try:
            run = _Run(spec, out, keeper, checked, snapshot, shards, commits, claim, ray_start, launch, progress, run_log)
            return run.execute(retry_failed)
        except BaseException as e:
            log.error("run %d ended: %s: %s", len(record.runs), type(e).__name__, e)
            raise


def _shards_per_replica(spec: JobSpec, record: JobRecord, input_rows: int) -> int:
    """Shards a replica may hold (its actor's threads): from the rows per shard this job
    plans with, known before the checks end (the pinned plan's, or the input's row count's)."""
    per_shard = (
        InputSnapshot.from_json(record.input).rows_per_shard
        if record.input is not None
        else rows_per_shard(spec.shards.rows_per_shard, input_rows)
    )
    return shards_per_replica(spec.resources.batch_size, per_shard, spec.generation.num_return_sequences)


def _abandon(ray_start: RayStart, launch: EarlyLaunch | None) -> None:
    """The run ends before dispatch: no replica is launched after this, those launched early
    are stopped, and the Ray this run started is shut down."""
    if launch is not None:
        launch.stop(wait_s=CLOSE_WAIT_S)
    ray_start.close()


def _planned_input(
    spec: JobSpec, out: OutputDir, record: JobRecord, checked: Checked
) -> tuple[InputSnapshot, list[Shard]]:
    """The input snapshot this job plans from, and its shards: pinned now by its first run (the
    plan: rows per shard decided once, a grouped plan's digest), else the one it was planned
    on, which the input read just now must still equal (row counts included)."""
    if record.input is None:
        per_shard = rows_per_shard(spec.shards.rows_per_shard, checked.input_rows)
        snapshot = InputSnapshot(per_shard, tuple(pin_input(spec.input, checked.files)))
        shards = plan_shards(spec, snapshot.input_files(), snapshot.rows_per_shard)
        if spec.shards.group_by_prefix == "on":
            snapshot = replace(snapshot, plan_digest=plan_digest(shards))
        record.input = snapshot.to_json()
        return snapshot, shards
    snapshot = InputSnapshot.from_json(record.input)
    changed = input_changes(spec, snapshot, checked.files)
    if changed:
        raise InputChanged(input_changed_message(out, changed))
    shards = plan_shards(spec, snapshot.input_files(), snapshot.rows_per_shard)
    digest = plan_digest(shards) if snapshot.plan_digest is not None else None
    if digest != snapshot.plan_digest:
        raise InputChanged(
            f"the shards grouped by prefix now differ from those the job in {out.uri} was planned with "
            f"(plan {digest}, pinned {snapshot.plan_digest}), though its input files did not change: "
            "this release keys prompts another way. Resume with the release that started the job, or write to a "
            "new output.uri"
        )
    return snapshot, shards


class _Run:
    """One driver run of a job, from a validated plan: runs its shards on replicas, then finalizes."""

    def __init__(
        self,
        spec: JobSpec,
        out: OutputDir,
        keeper: RecordKeeper,
        checked: Checked,
        snapshot: InputSnapshot,
        shards: list[Shard],
        commits: dict[int, CommitRecord],
        claim: OutputClaim,
        ray_start: RayStart,
        launch: EarlyLaunch,
        progress,
        run_log: RunLog,
    ):
        self.spec, self.out, self.keeper, self.run_log = spec, out, keeper, run_log
        self.ray_start, self.launch, self.pool = ray_start, launch, launch.pool
        self.record, self.claim = keeper.record, claim
        self.shards, self.rows_per_shard = shards, snapshot.rows_per_shard
        self.show_progress = progress
        c = self.record.counts
        c.input_rows, c.rows_total, c.shards_total = checked.input_rows, checked.output_rows, len(self.shards)
        self.job_facts = self._job_facts()  # the replicas add their engine and write it into every file
        self.commits = commits  # shard index -> commit record, checked against the plan
        count_committed(self.record, self.commits)
        self._dedupe_index = None  # filters.deduplicate: the replicas' shared index (a Ray actor)

    def _job_facts(self) -> dict:
        return {
            "fingerprint": self.spec.fingerprint(),
            "name": self.spec.name,
            "model": self.record.model,
            "generation": self.spec.generation.model_dump(mode="json"),
            "versions": library_versions(),
        }

    def execute(self, retry_failed: bool = False) -> JobRecord:
        try:
            return self._execute(retry_failed)
        finally:
            # The report reads only committed files and the record, so it is built while
            # Ray stops (after the final state: shutting down flushes its metrics).
            report = None
            if self.record.state in (JobState.SUCCEEDED, JobState.FAILED):
                report = threading.Thread(target=self._write_report, name="report", daemon=True)
                report.start()  # not on Ctrl-C: the user wants out
            self.launch.stop(wait_s=CLOSE_WAIT_S)  # a run that never dispatched (cancelled at once)
            self.ray_start.close()
            if self.ray_start.stopped_at is not None:
                self.record.run.mark("ray_stopped", self.ray_start.stopped_at)
            if report is not None:
                report.join(REPORT_WAIT_S)
                if report.is_alive():
                    log.warning("the report is still being built after %.0f s; `bulkgen report %s` rebuilds it",
                                REPORT_WAIT_S, self.out.uri)
            self._save_timeline()

    def _write_report(self) -> None:
        """The job's report (output.report), after _SUCCESS or the failure is recorded.
        A report that cannot be built must not fail the job: it is logged instead."""
        if not self.spec.output.report:
            return
        try:
            from jobs.report import write_report

            written = write_report(self.out.uri, self.out.storage_options)
            log.info("report: %s", written.html)
            self.record.run.mark("report_written")
        except Exception as e:
            log.warning("could not write the job's report (`bulkgen report %s` retries): %s: %s", self.out.uri,
                        type(e).__name__, e)

    def _save_timeline(self) -> None:
        """The run's last moments (Ray stopped, report written) into the record, which already
        holds its final state; never at the cost of the run's own outcome."""
        try:
            self.keeper.save()
        except Exception as e:
            log.warning("could not save the run's timeline: %s: %s", type(e).__name__, e)

    def _execute(self, retry_failed: bool) -> JobRecord:
        work = [Work(s) for s in self.shards if s.index not in self.commits]
        if retry_failed:
            with_errors = {i for i, c in self.commits.items() if c.errors}
            work += [Work(s, TaskKind.RETRY_FAILED) for s in self.shards if s.index in with_errors]
        self.keeper.move_to(JobState.RUNNING)
        log.info("%d shards, %d committed earlier, %d to run", len(self.shards), len(self.commits), len(work))
        try:
            if work:
                self._run_shards(work)
        except JobCancelled:
            self.keeper.move_to(JobState.CANCELLED, JobFailure("cancelled by the user", "running"))
            raise
        except KeyboardInterrupt:
            raise _interrupted(self.keeper, "running") from None
        except (JobError, BadInput) as e:  # BadInput: a model the replicas refuse
            self.keeper.fail(str(e))
            raise
        except ClaimLost:  # the output is another driver's now: leave its record alone
            raise
        except BaseException as e:  # storage gone for good, a bug: still leave a true record
            self.keeper.fail(f"{type(e).__name__}: {e}")
            raise
        try:
            record = finalize(self.spec, self.out, self.keeper, self.claim, self.commits)
            record.run.mark("finished", record.finished_at)
            return record
        except KeyboardInterrupt:
            if self.record.state.final:
                raise  # already succeeded (or failed): that is what the record says
            raise _interrupted(self.keeper, "finalizing") from None

    def _run_shards(self, work: list[Work]) -> None:
        spec, run = self.spec, self.record.run
        bar = None
        try:
            self.ray_start.result()  # Ray up (and, on this thread, the driver's signal handlers back)
            replicas = self.launch.result()  # the replicas launched early, where there was room
            run.mark("ray_ready", self.ray_start.ready_at)
            if self.launch.launched_at is None:
                self.pool.start(replicas.launch)
            run.mark("replicas_launched", self.launch.launched_at)
            self.pool.configure(self.job_facts)
            run.replica_plan = {
                "asked": spec.resources.replicas.to_json(),
                "launched": replicas.launch,
                "expected": replicas.expect,
                "how": replicas.how,
            }
            log.info("%d replica(s) (%s)", replicas.launch, replicas.how)
            sizes = (spec.resources.batch_size, self.rows_per_shard, spec.generation.num_return_sequences)
            scheduler = ShardScheduler(
                work, spec.shards.max_attempts, self.pool.shards_per_replica, replicas.expect, shards_per_batch(*sizes)
            )
            bar = _progress(self.record, self.show_progress)
            listener = CommitListener(spec, self.out, self.keeper, self.claim, self.run_log, scheduler, self.commits, bar)
            self._dedupe_index = start_dedupe_index(spec, self.out, self.commits.values())
            dispatch.run_shards(self.spec, scheduler, listener, self.pool)
        except ShardExhausted as e:
            shard = e.work.shard
            raise JobError(
                f"shard {shard.name} ({shard.url} {shard.describe_rows()}) failed {e.attempts} times "
                f"(shards.max_attempts); last error: {e.error}. "
                f"{len(self.commits)} committed shards are kept; fix the cause and resume"
            ) from None
        except ReplicasFailToStart as e:
            raise JobError(str(e)) from None
        finally:
            if bar is not None:
                bar.close()


def _interrupted(keeper: RecordKeeper, where: str) -> JobCancelled:
    """Ctrl-C or SIGTERM (jobs/cli.py makes it a KeyboardInterrupt): the record says cancelled, and where."""
    keeper.move_to(JobState.CANCELLED, JobFailure("interrupted (Ctrl-C or SIGTERM)", where))
    return JobCancelled("interrupted; committed shards are kept, resume with `bulkgen resume`")


def _progress(record: JobRecord, enabled: bool):
    from tqdm import tqdm

    c = record.counts
    return tqdm(
        total=c.rows_total,
        initial=c.rows_done + c.rows_failed + c.rows_filtered,
        unit="row",
        desc=record.name or "bulkgen",
        disable=None if enabled else True,  # None: only on a terminal
        dynamic_ncols=True,
    )


def resume_spec(output_uri: str, overrides: list[str] = (), storage_options: dict | None = None) -> JobSpec:
    """The spec recorded in an output's _job.json, ready to run again.

    Storage option values were redacted when recorded; credentials come from
    the environment, `storage_options` (the output's, --storage-option) or
    `overrides` (e.g. input.storage_options.key=...). The output's options
    among the overrides apply before the record is read: they may be what
    reaches it."""
    from jobs.storage_options import output_options

    options = output_options(storage_options or {}, overrides)
    data = read_record(output_uri, options).spec
    for section in ("input", "output", "cache"):
        if data.get(section) is not None:
            data[section]["storage_options"] = {}
    data.setdefault("output", {})["storage_options"] = options
    return spec_from_dict(apply_overrides(data, list(overrides)), source=f"{output_uri}/{RECORD}")


def request_cancel(output_uri: str, storage_options: dict | None = None) -> None:
    """Write the output's cancel request; OutputError if the job has ended (also if it
    ends while the request is written: the request is then withdrawn)."""
    from jobs import cancel

    out = OutputDir(output_uri, storage_options or {})
    cancel.write_request(out)
    cancel.withdraw_if_ended(out)
