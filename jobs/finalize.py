"""The end of a run whose shards are all committed: the batch files, the error budget,
the manifest, and _SUCCESS last.

Only a driver that still holds the claim writes the manifest and _SUCCESS;
anything that stops it half-way leaves a record that says finalizing (or
failed), never a _SUCCESS beside a job that did not succeed.
"""

from __future__ import annotations

from jobs import batch_output
from jobs.claim import OutputClaim
from jobs.core.layout import CANCEL, ERRORS, MANIFEST, STAGING, SUCCESS
from jobs.core.protocol import CommitRecord
from jobs.core.spec import JobSpec
from jobs.core.times import now
from jobs.output import OutputDir
from jobs.record import Counts, JobRecord, JobState, RecordKeeper
from jobs.run_errors import JobError


def finalize(spec: JobSpec, out: OutputDir, keeper: RecordKeeper, claim: OutputClaim, commits: dict[int, CommitRecord]) -> JobRecord:
    """Succeed the job, or fail it over its error budget (JobError)."""
    record = keeper.record
    keeper.move_to(JobState.FINALIZING)
    # output.format openai-batch: like a provider's batch, the job ends with both files, over its
    # error budget or not (request_counts says how many failed); before the manifest and _SUCCESS.
    batch_output.write_batch_files(spec, out, commits)
    over_budget = error_budget_exceeded(spec, record.counts, out)
    if over_budget:
        keeper.fail(over_budget)
        raise JobError(over_budget)
    manifest = {
        "fingerprint": spec.fingerprint(),
        "shards": [commits[i].to_json() for i in sorted(commits)],
        "rows_done": record.counts.rows_done,
        "rows_failed": record.counts.rows_failed,
    }
    claim.check_still_ours()
    out.write_json(MANIFEST, manifest)
    out.remove(STAGING)
    record.run.finished_at = now()
    keeper.move_to(JobState.SUCCEEDED)
    out.write_json(SUCCESS, {"finished_at": record.finished_at})
    out.remove(CANCEL)  # a request that came too late: `bulkgen cancel` withdraws one written after this
    return record


def error_budget_exceeded(spec: JobSpec, counts: Counts, out: OutputDir) -> str | None:
    """Why the failed rows are over shards.max_failed_fraction, or None."""
    failed_fraction = counts.rows_failed / counts.rows_total if counts.rows_total else 0.0
    if failed_fraction <= spec.shards.max_failed_fraction:
        return None
    return (
        f"{counts.rows_failed} of {counts.rows_total} rows failed ({failed_fraction:.2%}), over the error budget "
        f"shards.max_failed_fraction={spec.shards.max_failed_fraction}; see {out.url(ERRORS)}/"
    )
