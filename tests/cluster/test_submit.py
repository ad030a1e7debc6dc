"""`bulkgen submit` to a real local cluster with its dashboard and token auth:
follow a job to success, refuse a double submit, cancel and resume, and
survive the loss of the whole cluster (a new one finishes the job)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local_cluster import LocalCluster, psutil
from tests.conftest import job_dict, write_job, write_prompts
from tests.ray.conftest import assert_exactly_once
from tests.waiting import wait_for

pytestmark = pytest.mark.ray

BULKGEN = shutil.which("bulkgen", path=str(Path(sys.executable).parent)) or "bulkgen"
ROWS, ROWS_PER_SHARD = 30, 10
IDS = [f"row-{i:05d}" for i in range(ROWS)]
STATUS_EVERY_S = 1.0  # a check may run `bulkgen status`, a process of its own: poll gently
SUBMISSION = re.compile(r"submitted (bulkgen-[0-9a-f]{8}-[0-9a-f]{12}-run\d+) to (http://\S+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("rs"), num_cpus=2) as cluster:
        yield cluster


def bulkgen(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BULKGEN, *args], env=cluster.driver_env(), capture_output=True, text=True,
                          timeout=timeout)


def make_job(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    write_prompts(tmp_path / "in" / "prompts.parquet", ROWS)
    out = tmp_path / "out"
    spec = job_dict(str(tmp_path / "in"), str(out), tiny_model, generation={"max_new_tokens": 4},
                    resources={"replicas": 1}, shards={"rows_per_shard": ROWS_PER_SHARD})
    return write_job(tmp_path / "job.yaml", spec), out


def submit(cluster: LocalCluster, job: Path, *extra: str) -> str:
    done = bulkgen(cluster, "submit", str(job), "--address", cluster.dashboard_url, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    sid = SUBMISSION.search(done.stdout)
    assert sid, done.stdout
    assert f"bulkgen logs {sid[1]}" in done.stdout  # it says how to follow the job
    return sid[1]


def hold_shards_after_the_first(faults: Path) -> None:
    faults.mkdir(exist_ok=True)
    rule = {"action": "hold", "timeout": 300, "when": {"shard": {"min": 1}}}
    (faults / "replica.shard_start.json").write_text(json.dumps(rule))


def status(cluster: LocalCluster, sid: str) -> str:
    done = bulkgen(cluster, "status", sid, "--address", cluster.dashboard_url)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def test_submit_follow_to_success(cluster, tiny_model, tmp_path):
    job, out = make_job(tmp_path, tiny_model)
    sid = submit(cluster, job)

    # `logs --follow` returns when the job ends; `status` then says succeeded.
    followed = bulkgen(cluster, "logs", sid, "--address", cluster.dashboard_url, "--follow", timeout=300)
    assert followed.returncode == 0, followed.stderr
    assert "committed part-00002" in followed.stdout, followed.stdout[-3000:]
    shown = status(cluster, sid)
    assert f"submission: {sid}  (Ray job SUCCEEDED" in shown, shown
    assert "state:    succeeded" in shown and f"submission {sid}" in shown, shown

    assert_exactly_once(str(out), {}, IDS, n=1)
    # The driver's log outlives the cluster: a copy in the output, read by output URI too.
    by_output = bulkgen(cluster, "logs", str(out))
    assert by_output.returncode == 0 and "committed part-00002" in by_output.stdout, by_output.stdout[-2000:]
    record = json.loads((out / "_job.json").read_text())
    assert record["runs"][-1]["submission_id"] == sid


def test_double_submit_refused_then_cancel_and_resume(cluster, tiny_model, tmp_path):
    job, out = make_job(tmp_path, tiny_model)
    faults = tmp_path / "faults"
    hold_shards_after_the_first(faults)
    sid = submit(cluster, job, "--env", f"BULKGEN_FAULTS={faults}")
    wait_for(lambda: (out / "_commits" / "part-00000.json").exists(), 240, "the first commit", interval=STATUS_EVERY_S)

    again = bulkgen(cluster, "submit", str(job), "--address", cluster.dashboard_url)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "running" in again.stderr and sid in again.stderr, again.stderr

    cancelled = bulkgen(cluster, "cancel", sid, "--address", cluster.dashboard_url, timeout=120)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for(lambda: "state:    cancelled" in status(cluster, sid), 240, "the record to say cancelled",
             interval=STATUS_EVERY_S)
    first = (out / "data" / "part-00000.parquet").read_bytes()

    # The same spec again is the next run: it resumes from the commit log.
    resumed = submit(cluster, job)
    assert resumed != sid and resumed.endswith("-run2")
    wait_for(lambda: "state:    succeeded" in status(cluster, resumed), 240, "the resumed job to succeed",
             interval=STATUS_EVERY_S)
    assert_exactly_once(str(out), {}, IDS, n=1)
    assert (out / "data" / "part-00000.parquet").read_bytes() == first  # committed, not generated again
    assert sorted(p.name for p in (out / "_logs").iterdir()) == ["run-1.log", "run-2.log"]


def test_a_lost_cluster_and_a_new_one_finish_the_job(tiny_model, tmp_path, tmp_path_factory):
    job, out = make_job(tmp_path, tiny_model)
    faults = tmp_path / "faults"
    hold_shards_after_the_first(faults)
    lost = LocalCluster(tmp_path_factory.mktemp("rl"), num_cpus=2)
    try:
        lost.start_head()
        submit(lost, job, "--env", f"BULKGEN_FAULTS={faults}")
        wait_for(lambda: (out / "_commits" / "part-00000.json").exists(), 240, "the first commit",
                 interval=STATUS_EVERY_S)
        run_log = out / "_logs" / "run-1.log"
        wait_for(lambda: "committed part-00000" in run_log.read_text(), 240, "the run log's copy to show it",
                 interval=STATUS_EVERY_S)
        committed = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
        driver = json.loads((out / "_job.json").read_text())["runs"][-1]["pid"]
        lost.kill_node(lost.nodes[0])  # the head's whole process group, as if its machine were lost
        # Ray's job supervisor died with it; its watcher kills the driver (a session of its own) within seconds.
        wait_for(lambda: not _alive(driver), 120, "the driver to die with its cluster", interval=STATUS_EVERY_S)
    finally:
        lost.stop()

    with LocalCluster(tmp_path_factory.mktemp("rn"), num_cpus=2) as new:
        sid = submit(new, job)
        assert sid.endswith("-run2")
        wait_for(lambda: "state:    succeeded" in status(new, sid), 240, "the job to succeed on the new cluster",
                 interval=STATUS_EVERY_S)

    assert_exactly_once(str(out), {}, IDS, n=1)
    for name, data in committed.items():
        assert (out / "data" / name).read_bytes() == data, f"{name} was generated again"
    logs = sorted(p.name for p in (out / "_logs").iterdir())
    assert logs == ["run-1.log", "run-2.log"], logs


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
