"""The input a job was planned on is part of the job: a run into an output whose input has
changed since (a file added, removed or rewritten) is refused before anything runs, and the
output is left as it was; one driver per output, however close two start; --overwrite never
touches a directory bulkgen did not make. Each case was a silent wrong dataset (exit 0)
before input snapshots and claims."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from jobs.core.faults import ENV as FAULTS_ENV
from jobs.core.spec import spec_from_dict
from jobs.driver import JobCancelled, request_cancel
from jobs.output import OutputConflict
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import check_output, commit_records, read_record
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]


def ids(start: int, n: int) -> list[str]:
    return [f"row-{i:05d}" for i in range(start, start + n)]


def output_state(out: str) -> dict[str, str]:
    """Every file under the output but the logs and claims, by content hash, and the record's
    state and counts: what a refused run must leave as it was."""
    root = Path(out)
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in ("_logs", "_claims", "_job.json")
    }
    record = read_record(out)
    files["state"] = f"{record['state']} {sorted(record['counts'].items())} runs={len(record['runs'])}"
    return files


def _job(tmp_path: Path, model: Path, **sections) -> tuple[Path, str]:
    out = str(tmp_path / "out")
    spec = job_dict(str(tmp_path / "in"), out, model, generation={"max_new_tokens": 4}, **sections)
    return write_job(tmp_path / "job.yaml", spec), out


def test_a_grown_input_is_refused_and_overwrite_starts_over(fault_ray, tiny_model, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "b.parquet", 40)
    job, out = _job(tmp_path, tiny_model)
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    before = output_state(out)

    write_prompts(tmp_path / "in" / "a.parquet", 40, start=100)  # sorts first: every shard index would move
    capsys.readouterr()
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the input changed" in err and "added:" in err and "a.parquet" in err and "new output.uri" in err
    assert output_state(out) == before
    check_output(out, ids(0, 40))

    assert cli_main(["run", str(job), "--no-progress", "--overwrite"]) == 0
    check_output(out, ids(0, 40) + ids(100, 40))


@pytest.mark.parametrize("change", ["shrink", "rewrite-auto"])
def test_a_shrunk_or_rewritten_input_is_refused(change, fault_ray, tiny_model, tmp_path, capsys):
    if change == "shrink":
        write_prompts(tmp_path / "in" / "a.parquet", 20)
        write_prompts(tmp_path / "in" / "b.parquet", 20, start=20)
        job, out = _job(tmp_path, tiny_model)
    else:  # rows_per_shard auto: 40 rows cut 16 a shard; 400 would cut 25
        write_prompts(tmp_path / "in" / "a.parquet", 40)
        job, out = _job(tmp_path, tiny_model, shards={"rows_per_shard": "auto"})
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    before = output_state(out)
    if change == "shrink":
        (tmp_path / "in" / "b.parquet").unlink()
    else:
        write_prompts(tmp_path / "in" / "a.parquet", 400)
    capsys.readouterr()
    assert cli_main(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert ("removed:" if change == "shrink" else "rewritten:") in err, err
    assert output_state(out) == before
    assert cli_main(["status", out]) == 0
    assert "40/40 (100.0%)" in capsys.readouterr().out


def test_an_interrupted_job_whose_input_grew_does_not_resume(fault_ray, faults, job_threads, tiny_model, tmp_path):
    write_prompts(tmp_path / "in" / "b.parquet", 40)
    job, out = _job(tmp_path, tiny_model)
    faults.hold(from_shard=1)
    running = job_threads(spec_from_dict(job_dict(str(tmp_path / "in"), out, tiny_model, generation={"max_new_tokens": 4})))
    wait_for(lambda: commit_records(out), 180, "the first commit")
    request_cancel(out)
    assert isinstance(running.join(120)[1], JobCancelled)
    faults.clear()
    before = output_state(out)

    write_prompts(tmp_path / "in" / "a.parquet", 40, start=100)
    assert cli_main(["resume", out, "--no-progress"]) == 2
    assert output_state(out) == before
    (tmp_path / "in" / "a.parquet").unlink()  # the input as it was: the job resumes
    assert cli_main(["resume", out, "--no-progress"]) == 0
    check_output(out, ids(0, 40))


def test_two_drivers_started_at_once_one_runs_the_other_is_refused(
    fault_ray, faults, job_threads, tiny_model, tmp_path, monkeypatch
):
    write_prompts(tmp_path / "in" / "p.parquet", 30)
    out = str(tmp_path / "out")
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), out, tiny_model, generation={"max_new_tokens": 4}))
    # Both drivers wait just before creating their claim, then go at the same moment.
    monkeypatch.setenv(FAULTS_ENV, str(faults.dir))
    faults.rule("driver.claim", action="hold", timeout=120)
    drivers = [job_threads(spec), job_threads(spec)]
    wait_for(lambda: sum(e["point"] == "driver.claim" for e in faults.trace()) == 2, 60, "both drivers at the claim")
    (faults.dir / "driver.claim.release").touch()
    results = [d.join(180) for d in drivers]
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and isinstance(errors[0], OutputConflict), errors
    assert "claimed by a running driver (run 1" in str(errors[0])
    check_output(out, ids(0, 30))
    assert len(read_record(out)["runs"]) == 1


def test_overwrite_refuses_a_directory_bulkgen_did_not_make(fault_ray, tiny_model, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "p.parquet", 40)
    job, out = _job(tmp_path, tiny_model)
    write_prompts(tmp_path / "out" / "data" / "part-00000.parquet", 5, start=900)
    write_prompts(tmp_path / "out" / "data" / "part-00099.parquet", 5, start=950)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = {str(p): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    assert cli_main(["run", str(job), "--no-progress", "--overwrite"]) == 2
    assert "holds no bulkgen job record" in capsys.readouterr().err
    assert {str(p): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()} == before
