"""The driver: validate, claim the output, run the shards on replicas, commit, finalize.

It reads Parquet footers to plan and sends replicas shard tasks; rows go
from storage to the replicas and back (jobs/dispatch.py, jobs/output.py).

Over 300 lines because one run's life is one story told in order (claim,
validate, plan the replicas, dispatch, commit, finalize, report); what each
step does lives in its own module, and this one only sequences them.
"""

from __future__ import annotations

import logging
import time

from jobs import batch_output, dispatch, metrics, preflight
from jobs.cancel import cancel_requested
from jobs.claim import ClaimLost, OutputClaim
from jobs.cluster import connect
from jobs.core import faults, storage
from jobs.core.dedupe import DedupeIndex, index_name
from jobs.core.errors import BadInput, InputChanged, OutputError
from jobs.core.layout import BATCH_ERRORS, BATCH_OUTPUT, CANCEL, ERRORS, MANIFEST, RECORD, STAGING, SUCCESS
from jobs.core.protocol import CommitRecord, ShardResult, TaskKind
from jobs.core.rows import id_name
from jobs.core.snapshot import InputSnapshot
from jobs.core.spec import JobSpec, apply_overrides, spec_from_dict
from jobs.core.times import now
from jobs.dataset import pin_input
from jobs.output import (
    OutputDir,
    check_commits_match_plan,
    input_changed_message,
    input_changes,
    open_output,
    read_record,
)
from jobs.record import HEARTBEAT_S, JobFailure, JobRecord, JobState, RecordKeeper, committed_counts, library_versions
from jobs.run_log import COPY_EVERY_S, RunLog
from jobs.scheduler import ShardExhausted, ShardScheduler, Work, plan_replicas, shards_per_batch, shards_per_replica
from jobs.validate import Validated, check_input_and_model, check_output_usable

log = logging.getLogger(__name__)

RECORD_EVERY_S = 1.0  # at most this often on commits
CANCEL_POLL_S = 2.0


class JobError(RuntimeError):
    """The job ran and failed; committed shards are kept and the job can be resumed."""


class JobCancelled(RuntimeError):
    """The job was cancelled; committed shards are kept and the job can be resumed."""


def run_job(
    spec: JobSpec,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    retry_failed: bool = False,
) -> JobRecord:
    """Run (or resume) a job to its end; returns the final record.

    With `retry_failed`, committed shards that have dead letters are generated
    again too. Raises BadInput (before any replica starts), JobError or JobCancelled."""
    check_output_usable(spec)
    out, claim, record = open_output(spec, overwrite)  # refused before anything is written, or ours alone
    try:
        return _run_claimed(spec, out, claim, record, address, progress, retry_failed)
    finally:
        claim.release()


def _run_claimed(
    spec: JobSpec, out: OutputDir, claim: OutputClaim, record: JobRecord, address, progress, retry_failed
) -> JobRecord:
    if retry_failed:
        if storage.process_local(out.uri, out.storage_options):
            raise OutputError("retry-failed needs output storage that Ray workers can reach, not memory://")
        for name in (BATCH_OUTPUT, BATCH_ERRORS):  # the output is about to change
            out.remove(name)
    # _SUCCESS stands only beside a record that says succeeded: a re-run of a finished job
    # that is killed before it finalizes again must not leave one beside "validating".
    out.remove(SUCCESS)
    keeper = RecordKeeper(out, record, on_state=lambda r: metrics.job_state(spec, r))
    record.start_run(address, claim.number)
    with RunLog(out.uri, out.storage_options, len(record.runs)) as run_log:
        log.info("run %d of %s (%s) into %s", len(record.runs), spec.name or "job", spec.fingerprint(), out.uri)
        run_log.copy()  # the log exists from the start, even if this driver is killed
        keeper.move_to(JobState.VALIDATING)
        try:
            faults.inject("driver.validate")
            checked = check_input_and_model(spec)
            snapshot = _planned_input(spec, out, record, checked)
            commits = out.commit_records()
            check_commits_match_plan(out, commits, snapshot.shards())
        except KeyboardInterrupt:
            raise _interrupted(keeper, "validating") from None
        except BaseException as e:  # bad input, a bug, or storage gone: the record says which
            keeper.fail(str(e) if isinstance(e, BadInput) else f"{type(e).__name__}: {e}")
            log.error("validation failed: %s", e)
            raise
        record.model = checked.model
        try:
            run = _Run(spec, out, keeper, checked, snapshot, commits, claim, address, progress, run_log)
            return run.execute(retry_failed)
        except BaseException as e:
            log.error("run %d ended: %s: %s", len(record.runs), type(e).__name__, e)
            raise


def _planned_input(spec: JobSpec, out: OutputDir, record: JobRecord, checked: Validated) -> InputSnapshot:
    """The input snapshot this job plans from: pinned now by its first run, else the one it
    was planned on, which the input read just now must still equal (row counts included)."""
    if record.input is None:
        snapshot = InputSnapshot(checked.rows_per_shard, tuple(pin_input(spec.input, checked.files)))
        record.input = snapshot.to_json()
        return snapshot
    snapshot = InputSnapshot.from_json(record.input)
    changed = input_changes(spec, snapshot, checked.files)
    if changed:
        raise InputChanged(input_changed_message(out, changed))
    return snapshot


class _Run:
    """One driver run of a job: feeds the scheduler's shards to replicas and commits them."""

    def __init__(
        self,
        spec: JobSpec,
        out: OutputDir,
        keeper: RecordKeeper,
        checked: Validated,
        snapshot: InputSnapshot,
        commits: dict[int, CommitRecord],
        claim: OutputClaim,
        address,
        progress,
        run_log: RunLog,
    ):
        self.spec, self.out, self.keeper, self.address, self.run_log = spec, out, keeper, address, run_log
        self.record, self.claim = keeper.record, claim
        self.shards, self.rows_per_shard = snapshot.shards(), snapshot.rows_per_shard
        self.show_progress = progress
        c = self.record.counts
        c.input_rows, c.rows_total, c.shards_total = checked.input_rows, checked.output_rows, len(self.shards)
        self.retried_before = c.shards_retried
        self.job_facts = self._job_facts()  # the replicas add their engine and write it into every file
        self.commits = commits  # shard index -> commit record, checked against the plan
        self._recount()
        self.scheduler: ShardScheduler | None = None
        self.started_ray = False  # whether this run started Ray (and so shuts it down)
        self._dedupe_index = None  # filters.deduplicate: the replicas' shared index (a Ray actor)
        self.bar = None
        self._next_cancel_poll = 0.0

    def _job_facts(self) -> dict:
        return {
            "fingerprint": self.spec.fingerprint(),
            "name": self.spec.name,
            "model": self.record.model,
            "generation": self.spec.generation.model_dump(mode="json"),
            "versions": library_versions(),
        }

    def _recount(self) -> None:
        for name, value in committed_counts(self.commits.values()).items():
            setattr(self.record.counts, name, value)

    def execute(self, retry_failed: bool = False) -> JobRecord:
        try:
            return self._execute(retry_failed)
        finally:
            if self.started_ray:  # after the final state: shutting down flushes its metrics
                import ray

                ray.shutdown()
            if self.record.state in (JobState.SUCCEEDED, JobState.FAILED):  # not on Ctrl-C: the user wants out
                self._write_report()

    def _write_report(self) -> None:
        """The job's report (output.report), after _SUCCESS or the failure is recorded.
        A report that cannot be built must not fail the job: it is logged instead."""
        if not self.spec.output.report:
            return
        try:
            from jobs.report import write_report

            written = write_report(self.out.uri, self.out.storage_options)
            log.info("report: %s", written.html)
        except Exception as e:
            log.warning("could not write the job's report (`bulkgen report %s` retries): %s: %s", self.out.uri,
                        type(e).__name__, e)

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
        except JobError as e:
            self.keeper.fail(str(e))
            raise
        except ClaimLost:  # the output is another driver's now: leave its record alone
            raise
        except BaseException as e:  # storage gone for good, a bug: still leave a true record
            self.keeper.fail(f"{type(e).__name__}: {e}")
            raise
        try:
            return self._finalize()
        except KeyboardInterrupt:
            if self.record.state.final:
                raise  # already succeeded (or failed): that is what the record says
            raise _interrupted(self.keeper, "finalizing") from None

    def _run_shards(self, work: list[Work]) -> None:
        spec = self.spec
        self.started_ray = connect(self.address)
        try:
            # resources.replicas is resolved on the cluster just joined, before any replica starts.
            need = preflight.replica_need(spec.resources)
            nodes, node_types = preflight.cluster_nodes()
            preflight.check_replica_fits(spec.resources.replicas, need, nodes, node_types)
            replicas = plan_replicas(spec.resources.replicas, need, nodes)
            self.record.run.replica_plan = {
                "asked": spec.resources.replicas.to_json(),
                "launched": replicas.launch,
                "expected": replicas.expect,
                "how": replicas.how,
            }
            log.info("%d replica(s) (%s)", replicas.launch, replicas.how)
            sizes = (spec.resources.batch_size, self.rows_per_shard, spec.generation.num_return_sequences)
            self.scheduler = ShardScheduler(
                work, spec.shards.max_attempts, shards_per_replica(*sizes), replicas.expect, shards_per_batch(*sizes)
            )
            self.bar = _progress(self.record, self.show_progress)
            self._tokens_before = self.record.counts.completion_tokens
            self._start_dedupe_index()
            dispatch.run_shards(self.spec, self.scheduler, self.job_facts, self, replicas.launch)
        except ShardExhausted as e:
            shard = e.work.shard
            raise JobError(
                f"shard {shard.name} ({shard.url} rows {shard.start}:{shard.stop}) failed {e.attempts} times "
                f"(shards.max_attempts); last error: {e.error}. "
                f"{len(self.commits)} committed shards are kept; fix the cause and resume"
            ) from None
        except dispatch.ReplicasFailToStart as e:
            raise JobError(str(e)) from None
        finally:
            if self.bar is not None:
                self.bar.close()

    def _start_dedupe_index(self) -> None:
        """filters.deduplicate across the job: the index the replicas share (jobs/core/dedupe.py),
        seeded with the shards committed before this run. It lives as long as this driver."""
        import ray

        f = self.spec.filters
        if f is None or f.deduplicate == "none":
            return
        committed = [(self.out.url(c.data), self.spec.output.storage_options) for c in self.commits.values()]
        self._dedupe_index = ray.remote(DedupeIndex).options(name=index_name(self.spec.fingerprint()), num_cpus=0).remote(
            f.deduplicate == "near", f.near_duplicate_threshold, committed, id_name(self.spec.input)
        )

    # -- what the dispatch loop reports (dispatch.RunListener) ---------------------

    def tick(self) -> None:
        self.record.counts.shards_retried = self.retried_before + self.scheduler.retried
        self.keeper.save(every=HEARTBEAT_S)
        metrics.progress(self.spec, self.record, self.scheduler)
        self.run_log.copy(every=COPY_EVERY_S)
        if time.monotonic() >= self._next_cancel_poll:
            if cancel_requested(self.out):
                raise JobCancelled(f"cancelled through {self.out.url(CANCEL)}")
            self.claim.check_still_ours()
            self._next_cancel_poll = time.monotonic() + CANCEL_POLL_S

    def replica_ready(self, info: dict, ready: int) -> None:
        run = self.record.run
        if "replica" not in self.record.model:
            self.record.model["replica"] = info
            run.first_replica_ready_at = now()
        if ready >= run.replica_plan["launched"] and run.all_replicas_ready_at is None:
            run.all_replicas_ready_at = now()

    def shard_done(self, work: Work, result: ShardResult, tries: int) -> None:
        for url, data in (result.inline_files or {}).items():
            storage.write_bytes(url, data, self.spec.output.storage_options)
        shard = work.shard
        self.commits[shard.index] = self.out.commit(result, shard, tries)
        self._recount()
        if result.replica:
            # Counters are cumulative, and a replica's shards may report out of order: keep the latest.
            replicas, pid = self.record.run.replicas, str(result.replica["pid"])
            if result.replica.get("steps", 0) >= replicas.get(pid, {}).get("steps", 0):
                replicas[pid] = result.replica
        self.record.counts.shards_retried = self.retried_before + self.scheduler.retried
        self.keeper.save(every=RECORD_EVERY_S)
        metrics.progress(self.spec, self.record, self.scheduler, force=True)
        t = result.tally
        log.info("committed %s: %d rows, %d failed, %.1fs", shard.name, t.rows_done, t.rows_failed, result.seconds)
        self.bar.update(t.rows_done + t.rows_failed + t.rows_filtered)
        tokens = self.record.counts.completion_tokens - self._tokens_before
        elapsed = self.bar.format_dict.get("elapsed") or 0
        self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s" if elapsed else "", refresh=False)

    # -- the end -------------------------------------------------------------------

    def _finalize(self) -> JobRecord:
        self.keeper.move_to(JobState.FINALIZING)
        # output.format openai-batch: like a provider's batch, the job ends with both files, over its
        # error budget or not (request_counts says how many failed); before the manifest and _SUCCESS.
        batch_output.write_batch_files(self.spec, self.out, self.commits)
        c = self.record.counts
        failed_fraction = c.rows_failed / c.rows_total if c.rows_total else 0.0
        if failed_fraction > self.spec.shards.max_failed_fraction:
            message = (
                f"{c.rows_failed} of {c.rows_total} rows failed ({failed_fraction:.2%}), over the error budget "
                f"shards.max_failed_fraction={self.spec.shards.max_failed_fraction}; see {self.out.url(ERRORS)}/"
            )
            self.keeper.fail(message)
            raise JobError(message)
        manifest = {
            "fingerprint": self.spec.fingerprint(),
            "shards": [self.commits[i].to_json() for i in sorted(self.commits)],
            "rows_done": c.rows_done,
            "rows_failed": c.rows_failed,
        }
        self.claim.check_still_ours()
        self.out.write_json(MANIFEST, manifest)
        self.out.remove(STAGING)
        self.record.run.finished_at = now()
        self.keeper.move_to(JobState.SUCCEEDED)
        self.out.write_json(SUCCESS, {"finished_at": self.record.finished_at})
        self.out.remove(CANCEL)  # a request that came too late: `bulkgen cancel` withdraws one written after this
        return self.record


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
