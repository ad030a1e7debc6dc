"""A job with shards.group_by_prefix: on, its driver killed part-way, resumed: the resume
computes the same grouped plan, skips the committed shards, and every (id, sample_index)
lands exactly once."""

from __future__ import annotations

import json
import os
import signal

import pyarrow.parquet as pq
import pytest

from tests.conftest import job_dict, write_augment, write_job
from tests.faults.conftest import Faults, check_output, cli_env, commit_records, kill_left_behind, run_cli
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

PER_TEMPLATE, SHARDS = 12, 6  # 3 templates, each in two shards of 6 rows (rows_per_shard 10)


def test_a_grouped_job_killed_then_resumed_writes_every_row_once(
    bulkgen_procs, ray_tmpdirs, long_context_model, tmp_path
):
    template_of = write_augment(tmp_path / "in" / "augment.parquet", PER_TEMPLATE)
    out = str(tmp_path / "out")
    spec = job_dict(
        str(tmp_path / "in"), out, long_context_model,
        generation={"max_new_tokens": 6},
        resources={"replicas": 1, "batch_size": 4, "num_cpus": 1},
        shards={"rows_per_shard": 10, "group_by_prefix": "on"},
    )  # fmt: skip
    job = write_job(tmp_path / "job.yaml", spec)
    faults = Faults(tmp_path / "faults")
    faults.hold(from_shard=2)  # shards 0 and 1 commit, the rest wait in the replica
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))

    def two_committed():
        assert driver.proc.poll() is None, f"the driver exited early:\n{driver.output()[-3000:]}"
        return len(commit_records(out)) == 2

    wait_for(two_committed, 240, "two committed shards")
    tree = driver.tree()
    os.kill(driver.pid, signal.SIGKILL)
    driver.proc.wait(10)
    kill_left_behind(tree, ray_tmp)
    before = commit_records(out)
    assert sorted(before) == [0, 1]
    pinned = json.loads((tmp_path / "out" / "_job.json").read_text())["input"]["plan_digest"]

    resumed = run_cli("resume", out, "--no-progress", env=cli_env(ray_tmpdirs()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = check_output(out, list(template_of))
    assert result.record["state"] == "succeeded" and len(result.record["runs"]) == 2
    assert result.record["input"]["plan_digest"] == pinned  # the same plan, computed again
    assert {i: result.commits[i] for i in before} == before  # committed shards were skipped, not redone
    assert len(result.commits) == SHARDS
    for doc in result.commits.values():
        ids = pq.read_table(tmp_path / "out" / doc["data"], columns=["id"]).column("id").to_pylist()
        assert len({template_of[i] for i in ids}) == 1
        assert doc.get("input_row_count") in (None, len(ids))
    assert any("input_rows_digest" in doc for doc in result.commits.values())  # shuffled: rows are listed
