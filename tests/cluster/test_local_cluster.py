"""A real two-node Ray cluster on this machine (cluster/local_cluster.py): a job
joins it through `bulkgen run --address`, and a lost node is seen dead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local_cluster import LocalCluster, psutil  # Ray's bundled psutil when none is installed
from tests.conftest import job_dict, write_job, write_prompts

pytestmark = pytest.mark.ray

BULKGEN = shutil.which("bulkgen", path=str(Path(sys.executable).parent)) or "bulkgen"


@pytest.fixture
def cluster(tmp_path_factory):
    """A head with 1 CPU; Ray's files and sockets under a short tmp dir."""
    with LocalCluster(tmp_path_factory.mktemp("rc"), num_cpus=1, dashboard=False) as cluster:
        yield cluster


def running_in(sessions: set[int], pids) -> list[int]:
    """Which of `pids` still run in one of `sessions` (a pid reused since is another's)."""
    left = []
    for pid in pids:
        try:
            if os.getsid(pid) in sessions and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except (OSError, psutil.NoSuchProcess):
            continue
    return left


def test_job_runs_through_address_and_stop_leaves_nothing(cluster, tiny_model, tmp_path):
    cluster.add_node(num_cpus=1)
    assert cluster.alive_nodes() == {"head", "node-1"}

    write_prompts(tmp_path / "in" / "prompts.parquet", 20)
    # 2 replicas of 1 CPU on two 1-CPU nodes: one replica runs on each.
    spec = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                    generation={"max_new_tokens": 6}, resources={"replicas": 2, "num_cpus": 1})
    job = write_job(tmp_path / "job.yaml", spec)
    done = subprocess.run([BULKGEN, "run", str(job), "--address", cluster.address, "--no-progress"],
                          env=cluster.driver_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "out" / "_SUCCESS").exists()

    nodes = list(cluster.nodes)
    running = {p.pid for n in nodes for p in cluster.processes(n)}  # raylets, agents, workers...
    assert {n.pid for n in nodes} <= running  # both `ray start`s are still up
    recorded = running | {pid for n in nodes for pid in n.pids}
    cluster.stop()
    # Each `ray start` leads its own session: a pid reused since by someone else is not in one.
    assert running_in({n.pgid for n in nodes}, recorded) == []


def test_killed_node_is_seen_dead(cluster):
    node = cluster.add_node(num_cpus=1)  # returns once the head sees it alive
    members = cluster.processes(node)
    assert node.pid in {p.pid for p in members}

    cluster.kill_node(node)
    assert running_in({node.pgid}, [p.pid for p in members]) == []
    # The head notices through missed health checks (~10-15 s with Ray's defaults).
    assert cluster.alive_nodes(timeout=60, want={"head"}) == {"head"}
