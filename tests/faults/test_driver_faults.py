"""The driver dies, is cancelled, or gets Ctrl-C: `bulkgen run` subprocesses, each with
its own local Ray under a short RAY_TMPDIR and a fault rule that holds shards 1 and up in
the replicas, so the job is partly done when the driver is hit."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import (
    Faults,
    check_output,
    cli_env,
    commit_records,
    kill_left_behind,
    ray_processes,
    read_record,
    run_cli,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

ROWS, SHARDS = 30, 3
IDS = [f"row-{i:05d}" for i in range(ROWS)]


def _job(tmp_path: Path, model: Path) -> tuple[Path, str, Faults]:
    """A 3-shard job whose shards from 1 on wait in the replica until released."""
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    out = str(tmp_path / "out")
    spec = job_dict(
        str(tmp_path / "in"),
        out,
        model,
        generation={"max_new_tokens": 16},
        resources={"replicas": 1, "batch_size": 2, "num_cpus": 1},
    )
    faults = Faults(tmp_path / "faults")
    faults.hold(from_shard=1)
    return write_job(tmp_path / "job.yaml", spec), out, faults


def _some_committed(driver, out: str):
    """At least one shard committed, not all, and the record says so too."""
    assert driver.proc.poll() is None, f"the driver exited early:\n{driver.output()[-3000:]}"
    committed = commit_records(out)
    record = read_record(out)
    if committed and len(committed) < SHARDS and record and record["counts"]["shards_committed"] == len(committed):
        return committed
    return None


def _files(out: str, committed: dict) -> dict[int, tuple[str, int, str]]:
    """shard -> (sha256, mtime_ns, attempt) of its committed data file."""
    files = {}
    for index, doc in committed.items():
        path = Path(out) / doc["data"]
        files[index] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, doc["attempt"])
    return files


def test_driver_killed_then_resume(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    job, out, faults = _job(tmp_path, tiny_model)
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))
    wait_for(lambda: _some_committed(driver, out), 240, "a committed shard, with more to go")

    tree = driver.tree()
    os.kill(driver.pid, signal.SIGKILL)
    driver.proc.wait(10)
    # The local Ray it started outlives it: its children, and whatever runs under its RAY_TMPDIR.
    kill_left_behind(tree, ray_tmp)
    assert not ray_processes(ray_tmp)

    committed = commit_records(out)
    assert 0 < len(committed) < SHARDS
    before = _files(out, committed)

    status = run_cli("status", out, "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["state"] == "running"  # nobody is left to say otherwise
    assert shown["counts"]["shards_committed"] == len(committed)
    assert shown["counts"]["rows_done"] == sum(doc["rows_done"] for doc in committed.values())
    assert shown["counts"]["shards_total"] == SHARDS
    text = run_cli("status", out).stdout
    assert "state:    running" in text and f"{len(committed)}/{SHARDS} committed" in text, text
    assert "driver is gone" in text, text

    resumed = run_cli("resume", out, "--no-progress", env=cli_env(ray_tmpdirs()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = check_output(out, IDS)
    assert result.record["state"] == "succeeded"
    assert len(result.record["runs"]) == 2
    # Committed shards were skipped, not regenerated: same bytes, same mtime, same attempt.
    assert {i: v for i, v in _files(out, result.commits).items() if i in before} == before


def test_driver_killed_between_a_result_and_its_commit_then_resume(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    """The loop hands a finished shard to its committer thread and moves on: a driver that dies
    before that commit leaves the shard uncommitted (its files staged at most), and the resume
    runs it again. Every row lands once; shards committed before are kept as they are."""
    job, out, faults = _job(tmp_path, tiny_model)
    faults.rule("committer.before_record", action="exit", code=17, when={"shard": 1})
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))
    wait_for(lambda: _some_committed(driver, out), 240, "a committed shard, with more to go")
    tree = driver.tree()
    faults.release()  # shards 1 and 2 run now; shard 1's result reaches the committer, which exits

    assert driver.wait(240) == 17, driver.output()[-3000:]
    kill_left_behind(tree, ray_tmp)
    committed = commit_records(out)
    assert 0 in committed and 1 not in committed
    before = _files(out, committed)

    resumed = run_cli("resume", out, "--no-progress", env=cli_env(ray_tmpdirs()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = check_output(out, IDS)
    assert result.record["state"] == "succeeded" and len(result.record["runs"]) == 2
    assert {i: v for i, v in _files(out, result.commits).items() if i in before} == before


def test_cancel(bulkgen_procs, ray_tmpdirs, fault_ray, faults, tiny_model, tmp_path):
    job, out, held = _job(tmp_path, tiny_model)
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, held.dir))
    wait_for(lambda: _some_committed(driver, out), 240, "a committed shard, with more to go")

    cancel = run_cli("cancel", out)
    assert cancel.returncode == 0, cancel.stderr
    assert driver.wait(120) == 130, driver.output()[-3000:]
    assert "cancelled" in driver.output()
    record = read_record(out)
    assert record["state"] == "cancelled" and "cancel" in record["error"]["message"]
    committed = commit_records(out)
    assert 0 < len(committed) < SHARDS, "the job ended before the cancel took effect"
    assert record["counts"]["shards_committed"] == len(committed)
    before = _files(out, committed)
    # The driver stopped the Ray it started.
    wait_for(lambda: not ray_processes(ray_tmp), 60, "the cancelled driver's Ray to stop")

    # `bulkgen resume`, here on the test's own Ray (no fault switched on).
    assert cli_main(["resume", out, "--no-progress"]) == 0
    result = check_output(out, IDS)
    assert result.record["state"] == "succeeded"
    assert not (Path(out) / "_CANCEL").exists()
    assert {i: v for i, v in _files(out, result.commits).items() if i in before} == before


def test_ctrl_c(bulkgen_procs, ray_tmpdirs, fault_ray, faults, tiny_model, tmp_path):
    job, out, held = _job(tmp_path, tiny_model)
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmpdirs(), held.dir))
    wait_for(lambda: _some_committed(driver, out), 240, "a committed shard, with more to go")

    driver.proc.send_signal(signal.SIGINT)
    assert driver.wait(120) == 130, driver.output()[-3000:]
    record = read_record(out)
    assert record["state"] == "cancelled", record["state"]
    assert "interrupted" in record["error"]["message"]
    committed = commit_records(out)
    assert 0 < len(committed) < SHARDS
    before = _files(out, committed)

    # Resumable: `bulkgen resume` here on the test's own Ray (no fault switched on).
    assert cli_main(["resume", out, "--no-progress"]) == 0
    result = check_output(out, IDS)
    assert result.record["state"] == "succeeded"
    assert {i: v for i, v in _files(out, result.commits).items() if i in before} == before
