"""Resuming a partial job: committed shards are skipped (their commit records and files
untouched), another spec is refused, and a second driver is refused while one runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import JobCancelled, request_cancel, run_job
from jobs.output import OutputConflict
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import check_output, commit_records, read_record, run_cli
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

IDS = [f"row-{i:05d}" for i in range(60)]


def _snapshot(out: str) -> tuple[dict, dict]:
    commits = commit_records(out)
    mtimes = {i: (Path(out) / doc["data"]).stat().st_mtime_ns for i, doc in commits.items()}
    return commits, mtimes


def test_resume_same_and_conflict(fault_ray, faults, job_threads, tiny_model, tmp_path):
    write_prompts(tmp_path / "in" / "p.parquet", 60)
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"),
        out,
        tiny_model,
        generation={"max_new_tokens": 16},
        resources={"replicas": 1, "batch_size": 2, "num_cpus": 1},
    )
    job_file = write_job(tmp_path / "job.yaml", data)
    faults.hold(from_shard=2)  # shards 0 and 1 commit, the rest wait
    job = job_threads(spec_from_dict(data))

    def two_committed():
        assert job.alive(), f"the job ended early: {job.error!r}"
        return len(commit_records(out)) == 2

    wait_for(two_committed, 180, "two committed shards")
    # A second driver on the same running job is refused before it touches anything.
    second = run_cli("run", str(job_file), "--no-progress")
    assert second.returncode == 2 and "running driver" in second.stderr, second.stderr
    request_cancel(out)
    _, error = job.join(120)
    assert isinstance(error, JobCancelled), error
    commits, mtimes = _snapshot(out)
    assert sorted(commits) == [0, 1]
    record = read_record(out)
    assert record["state"] == "cancelled" and len(record["runs"]) == 1

    # Another spec into this output is refused, and changes nothing.
    other = {**data, "generation": {"max_new_tokens": 17}}
    with pytest.raises(OutputConflict, match="different job spec"):
        run_job(spec_from_dict(other), progress=False)
    assert _snapshot(out) == (commits, mtimes)
    assert read_record(out) == record

    # The same spec (more replicas is the same job) resumes: committed shards are skipped.
    faults.clear()
    resumed = {**data, "resources": {**data["resources"], "replicas": 2}}
    final = run_job(spec_from_dict(resumed), progress=False)
    assert final.state == "succeeded" and len(final.runs) == 2
    result = check_output(out, IDS)
    after, after_mtimes = _snapshot(out)
    assert {i: after[i] for i in commits} == commits, "a committed shard's commit record changed"
    assert {i: after_mtimes[i] for i in mtimes} == mtimes, "a committed shard's data file was rewritten"
    assert sorted(after) == list(range(6))
    redone = {e[1] for e in faults.events() if e[0] == "start"}
    assert not redone & set(commits), f"committed shards were generated again: {sorted(redone & set(commits))}"
    assert result.record["counts"]["rows_done"] == 60
