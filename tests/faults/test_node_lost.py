"""A worker node lost mid-job: a head with no CPUs and two one-CPU nodes on this machine,
`bulkgen run --address` as the driver; one node's whole process group is SIGKILLed.

The nodes are started with BULKGEN_FAULTS in their environment, which their Ray workers
inherit: the replicas on a cluster the driver joins get the fault directory that way."""

from __future__ import annotations

import os

import pytest

from jobs.core.faults import ENV as FAULTS_ENV
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import Faults, check_output, cli_env, commit_records
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]


@pytest.fixture(scope="module")
def cluster_faults(tmp_path_factory) -> Faults:
    return Faults(tmp_path_factory.mktemp("cf"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cluster_faults):
    from cluster.local_cluster import LocalCluster

    with pytest.MonkeyPatch.context() as env:
        # The nodes copy this env: notice a dead node in seconds, not the default half
        # minute, and give every worker the fault directory.
        env.setenv("RAY_health_check_period_ms", "1000")
        env.setenv("RAY_health_check_failure_threshold", "5")
        env.setenv(FAULTS_ENV, str(cluster_faults.dir))
        c = LocalCluster(tmp_path_factory.mktemp("lc"), num_cpus=0, timeout=120)
        try:
            c.start_head()
            c.add_node(num_cpus=1)
            c.add_node(num_cpus=1)
            yield c
        finally:
            c.stop()


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def test_node_lost(cluster, cluster_faults, bulkgen_procs, tiny_model, tmp_path):
    write_prompts(tmp_path / "in" / "p.parquet", 60)
    out = str(tmp_path / "out")
    job = write_job(
        tmp_path / "job.yaml",
        job_dict(
            str(tmp_path / "in"),
            out,
            tiny_model,
            generation={"max_new_tokens": 16},
            resources={"replicas": 2, "batch_size": 2, "num_cpus": 1},
        ),
    )
    faults = cluster_faults
    faults.clear()
    faults.slow(0.15)
    env = {**cli_env(fault_dir=faults.dir), **cluster.env}
    workers = {n.pgid: n for n in cluster.nodes if n.name != "head"}
    assert len(workers) == 2
    driver = bulkgen_procs(["run", str(job), "--address", cluster.address, "--no-progress"], env)

    node_of: dict[int, str] = {}  # replica pid -> node name, seen while the pids were alive

    def victim():
        assert driver.proc.poll() is None, f"the driver exited early:\n{driver.output()[-3000:]}"
        for _, _, _, pid in faults.events():
            if pid not in node_of and _session(pid) in workers:
                node_of[pid] = workers[_session(pid)].name
        committed = commit_records(out)
        if not committed or len(set(node_of.values())) < 2:
            return None
        for shard, attempt, pid in faults.running():
            if shard not in committed and pid in node_of:
                return shard, attempt, pid
        return None

    shard, attempt, pid = wait_for(victim, 240, "a commit, replicas on both nodes, and one mid-shard")
    lost = next(n for n in cluster.nodes if n.name == node_of[pid])
    survivor = next(n.name for n in workers.values() if n.name != lost.name)
    cluster.kill_node(lost)
    wait_for(lambda: _session(pid) is None, 120, f"replica {pid} to be gone with its node")

    code = driver.wait(300)
    assert code == 0, driver.output()[-3000:]
    result = check_output(out, [f"row-{i:05d}" for i in range(60)])
    assert result.record["state"] == "succeeded"
    assert result.record["counts"]["shards_retried"] >= 1
    assert ("end", shard, attempt, pid) not in faults.events(), "the lost node finished the shard"
    redo = result.commits[shard]["attempt"]
    assert redo != attempt
    finishers = {a: p for kind, _, a, p in faults.events() if kind == "end"}
    assert node_of.get(finishers[redo]) == survivor, "the lost shard was redone off the surviving node"

