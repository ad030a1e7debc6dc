"""The row cache under concurrency and crashes: two jobs sharing one cache at once, and a
driver killed mid-job (no entry for a shard that was never committed)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import (
    Faults,
    check_output,
    cli_env,
    commit_records,
    kill_processes,
    ray_processes,
    run_cli,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]


def cache_job(tmp_path: Path, name: str, model: Path, cache: Path, start: int, rows: int) -> tuple[Path, str]:
    write_prompts(tmp_path / name / "in" / "p.parquet", rows, start=start)
    out = str(tmp_path / name / "out")
    spec = job_dict(str(tmp_path / name / "in"), out, model, generation={"max_new_tokens": 6},
                    resources={"replicas": 1, "batch_size": 8}, shards={"rows_per_shard": 20})  # fmt: skip
    spec["cache"] = {"uri": str(cache)}
    return write_job(tmp_path / name / "job.yaml", spec), out


def entries(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in cache.rglob("*.json")]


def sequences(out: str, ids) -> set[tuple]:
    result = check_output(out, ids)
    return {(r["text"], r["finish_reason"], r["completion_tokens"]) for r in result.data}


def test_two_jobs_share_one_cache_at_once(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    # Rows 40-79 are in both jobs: both may miss them at once and write the same entries.
    job_a, out_a = cache_job(tmp_path, "a", tiny_model, cache, start=0, rows=80)
    job_b, out_b = cache_job(tmp_path, "b", tiny_model, cache, start=40, rows=80)
    a = bulkgen_procs(["run", str(job_a), "--no-progress"], cli_env(ray_tmpdirs()))
    b = bulkgen_procs(["run", str(job_b), "--no-progress"], cli_env(ray_tmpdirs()))
    assert a.wait(300) == 0, a.output()[-3000:]
    assert b.wait(300) == 0, b.output()[-3000:]

    from_a = sequences(out_a, [f"row-{i:05d}" for i in range(80)])
    from_b = sequences(out_b, [f"row-{i:05d}" for i in range(40, 120)])
    cached = entries(cache)  # each parses whole
    assert len(cached) == 120  # one entry per distinct sequence: rows 0-119
    assert {(e["text"], e["finish_reason"], e["completion_tokens"]) for e in cached} == from_a | from_b


def test_a_killed_job_leaves_no_entry_for_an_uncommitted_shard(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    job, out = cache_job(tmp_path, "job", tiny_model, cache, start=0, rows=60)
    faults = Faults(tmp_path / "faults")
    # Shards 1 and 2 generate their rows, then wait before returning them: never committed.
    faults.rule("replica.shard_end", action="hold", timeout=300, when={"shard": {"min": 1}})
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))
    wait_for(lambda: 0 in commit_records(out), 240, "shard 0 committed")
    wait_for(lambda: len(entries(cache)) == 20, 240, "shard 0's rows in the cache")
    wait_for(lambda: sum(1 for t in faults.trace() if t["point"] == "replica.shard_end") == 3, 240,
             "shards 1 and 2 generated too")  # fmt: skip

    os.kill(driver.pid, signal.SIGKILL)
    driver.proc.wait(10)
    kill_processes([*driver.tree(), *ray_processes(ray_tmp)])
    assert sorted(commit_records(out)) == [0]
    assert len(entries(cache)) == 20  # shard 0's rows, nothing of the held shards

    faults.clear()
    resumed = run_cli("resume", out, "--no-progress", env=cli_env(ray_tmpdirs()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sequences(out, [f"row-{i:05d}" for i in range(60)]) == {
        (e["text"], e["finish_reason"], e["completion_tokens"]) for e in entries(cache)
    }
