"""Keep every batch full (issue 20): a replica refills from another held shard while one drains.

A shard's rows leave the engine (the replica says so: ShardProgress) long before its
files are written and committed. The driver then sends that replica its next shard at
once. Here every shard is held in its replica right after generating (a fault hold at
replica.after_generate): with shards 0 and 1 (its depth) held, the same replica must
receive and generate shard 2 meanwhile, which a replica that counts a shard until its
result never does. Asserted from the replica's trace, not from timing.
"""

from __future__ import annotations

import pytest

from jobs.core.spec import spec_from_dict
from tests.conftest import job_dict, write_prompts
from tests.faults.conftest import _fault_ray_owner, check_output, fault_dir, fault_ray, faults, job_threads  # noqa: F401
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

ROWS = 40  # four shards of ten


def test_a_replica_refills_from_another_held_shard_while_one_drains(fault_ray, faults, job_threads, tiny_model, tmp_path):
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    out = str(tmp_path / "out")
    # One replica whose depth is two shards (a batch of 2 is less than one shard of 10).
    data = job_dict(str(tmp_path / "in"), out, tiny_model, resources={"replicas": 1, "batch_size": 2, "num_cpus": 1})
    faults.rule("replica.after_generate", action="hold")  # the trace has each shard as it gets there
    job = job_threads(spec_from_dict(data))

    def passed(point: str, shard: int) -> list[dict]:
        return [e for e in faults.trace() if e["point"] == point and e["shard"] == shard]

    def shard_2_generated_while_0_and_1_are_held():
        assert job.alive(), f"the job ended with shards held: {job.error!r}"
        return passed("replica.after_generate", 2)

    [refill] = wait_for(shard_2_generated_while_0_and_1_are_held, 180, "shard 2 generated while 0 and 1 are held")
    held = passed("replica.after_generate", 0) + passed("replica.after_generate", 1)
    # The same replica: it took shard 2 with shards 0 and 1 still in its hands.
    assert [e["pid"] for e in held] == [refill["pid"]] * 2
    assert not passed("replica.shard_end", 0) and not passed("replica.shard_end", 1), "written before the release"
    (faults.dir / "replica.after_generate.release").touch()

    record, error = job.join(240)
    assert error is None, f"job failed: {error!r}"
    result = check_output(out, [f"row-{i:05d}" for i in range(ROWS)])
    assert record.state == "succeeded" and result.record["counts"]["shards_committed"] == 4
    assert all(c["attempts"] == 1 for c in result.commits.values())  # held, not lost: nothing retried
