"""`resources.replicas` on a cluster: the check that one replica fits some node (pure,
no Ray), and a job with the spec's defaults using every CPU of a 2-CPU local Ray."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.core.errors import ClusterError
from jobs.core.spec import ReplicaCount, spec_from_dict
from jobs.driver import run_job
from jobs.replica_plan import check_replica_fits, replica_need
from tests.conftest import job_dict, start_local_ray, write_prompts
from tests.ray.conftest import assert_exactly_once, assert_finished_layout
from tests.waiting import wait_for

GPU1 = {"CPU": 1.0, "GPU": 1.0}
CPU_NODE = {"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 8e9}


def test_replica_need_is_what_the_actor_asks_ray_for():
    spec = spec_from_dict(job_dict("/in", "/out", "org/m", resources={"num_cpus": 2, "num_gpus": 0.5}))
    assert replica_need(spec.resources) == {"CPU": 2.0, "GPU": 0.5}


@pytest.mark.parametrize("count", ["auto", 4, "1..4"])
def test_a_replica_that_fits_a_live_node_passes(count):
    check_replica_fits(ReplicaCount.parse(count), {"CPU": 1.0, "GPU": 0.0}, [CPU_NODE], None)
    check_replica_fits(ReplicaCount.parse(count), GPU1, [CPU_NODE, GPU_NODE], None)


@pytest.mark.parametrize("count", ["auto", 4, "1..4"])
def test_a_replica_that_fits_no_node_and_no_node_type_is_refused(count):
    with pytest.raises(ClusterError) as info:
        check_replica_fits(ReplicaCount.parse(count), GPU1, [CPU_NODE], [{"CPU": 16.0}])
    message = str(info.value)
    assert message.startswith(f"resources.replicas {count}: one replica needs 1 CPU, 1 GPU")
    assert "2 CPU, 0 GPU" in message and "16 CPU, 0 GPU" in message  # what the cluster has
    assert "lower resources.num_cpus / resources.num_gpus" in message


def test_a_replica_bigger_than_every_node_is_refused_though_the_cluster_has_enough_in_all():
    two_cpu_nodes = [CPU_NODE, CPU_NODE]
    with pytest.raises(ClusterError, match="one replica needs 3 CPU, 0 GPU"):
        check_replica_fits(ReplicaCount.parse("auto"), {"CPU": 3.0, "GPU": 0.0}, two_cpu_nodes, None)


def test_a_node_type_the_autoscaler_may_add_is_room_enough():
    # A GPU group scaled to zero: no live node fits, the autoscaler's config says one may come.
    for count in ("auto", 2, "1..8"):
        check_replica_fits(ReplicaCount.parse(count), GPU1, [CPU_NODE], [{"CPU": 8.0, "GPU": 4.0}])


def test_a_range_is_not_refused_where_the_cluster_tells_no_node_types():
    # A range says the cluster autoscales; without its node types the driver cannot know better.
    check_replica_fits(ReplicaCount.parse("1..8"), GPU1, [CPU_NODE], None)
    # A count or auto is refused there, and told how to wait for nodes.
    for count in ("auto", 2):
        with pytest.raises(ClusterError, match=r'give resources.replicas as a range, e.g. "1..4"'):
            check_replica_fits(ReplicaCount.parse(count), GPU1, [CPU_NODE], None)


def test_a_replica_asking_for_nothing_fits_anywhere():
    check_replica_fits(ReplicaCount.parse("auto"), {"CPU": 0.0, "GPU": 0.0}, [], None)


@pytest.fixture
def held_ray(tmp_path_factory, monkeypatch):
    """A 2-CPU local Ray of its own whose replicas stop at every shard start until released
    (jobs/core/faults.py): so the first replica to load cannot finish the job before the
    second one loads, however the two loads race. The shared instance is shut down first
    (the next test that asks for it starts it again), and this one after."""
    import ray

    from jobs.core.faults import ENV

    fault_dir = tmp_path_factory.mktemp("held")
    (fault_dir / "replica.shard_start.json").write_text('{"action": "hold", "timeout": 900}')
    monkeypatch.setenv(ENV, str(fault_dir))  # the driver's own fault points only trace
    ray.shutdown()
    start_local_ray(tmp_path_factory.mktemp("ray"), runtime_env={"env_vars": {ENV: str(fault_dir)}})
    yield fault_dir
    (fault_dir / "replica.shard_start.release").touch()
    ray.shutdown()


def replicas_holding_a_shard(fault_dir: Path) -> set[int]:
    trace = fault_dir / "trace.jsonl"
    lines = trace.read_text().splitlines() if trace.exists() else []
    return {json.loads(line)["pid"] for line in lines if '"replica.shard_start"' in line}


@pytest.mark.ray
def test_default_replicas_use_both_cpus_of_a_two_cpu_ray(held_ray, tiny_model, tmp_path):
    import ray

    assert ray.cluster_resources()["CPU"] == 2  # tests/conftest.py's start_local_ray
    write_prompts(tmp_path / "in" / "a.parquet", 64)
    data = job_dict(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        tiny_model,
        resources={"batch_size": 4},
        shards={"rows_per_shard": 4},
    )
    del data["resources"]["replicas"], data["resources"]["num_cpus"]  # the spec's defaults: auto, 1 CPU each
    spec = spec_from_dict(data)
    assert spec.resources.replicas.auto and spec.resources.num_cpus == 1

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_job, spec, progress=False)

        def both_hold_a_shard() -> bool:
            if len(replicas_holding_a_shard(held_ray)) >= 2:
                return True
            assert not job.done(), f"the job ended with one replica holding shards: {job.exception()!r}"
            return False

        # Two replicas each at a shard: both were placed (the driver holds no CPU of its own) and loaded.
        wait_for(both_hold_a_shard, 300, "a second replica to start a shard")
        (held_ray / "replica.shard_start.release").touch()
        record = job.result(timeout=300)

    out = assert_exactly_once(str(tmp_path / "out"), {}, [f"row-{i:05d}" for i in range(64)], n=1)
    assert_finished_layout(out, shards=16, rows_total=64)
    run = out.record["runs"][-1]
    assert run["replica_plan"] == {
        "asked": "auto",
        "launched": 2,
        "expected": 2,
        "how": "auto: 2 CPUs / 1 per replica",
    }
    assert run["all_replicas_ready_at"] is not None
    assert len(run["replicas"]) == 2 == len(replicas_holding_a_shard(held_ray)), sorted(run["replicas"])
    assert record.run.replica_plan["launched"] == 2
