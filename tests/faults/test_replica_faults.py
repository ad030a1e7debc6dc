"""Faults inside the replicas and their storage: a killed replica, a shard that always
fails, storage that resets connections. Every test ends with the exactly-once check."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.faults import ENV as FAULTS_ENV
from jobs.core.spec import spec_from_dict
from jobs.driver import JobError
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import (
    check_output,
    cli_env,
    commit_records,
    read_record,
    run_cli,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]


def _ids(n: int) -> list[str]:
    return [f"row-{i:05d}" for i in range(n)]


ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_replica_killed(fault_ray, faults, job_threads, tiny_model, tmp_path, engine):
    write_prompts(tmp_path / "in" / "p.parquet", 40)
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"),
        out,
        tiny_model,
        generation={"max_new_tokens": 16},
        resources={"replicas": 2, "batch_size": 2, "num_cpus": 1},
    )
    data["model"]["engine"] = engine
    if engine == "vllm":
        data["model"]["engine_options"] = {"enforce_eager": True}
    spec = spec_from_dict(data)
    faults.slow(0.15)  # per sequence: a shard takes over a second, long enough to be caught mid-way
    job = job_threads(spec)

    def victim():
        assert job.alive(), f"the job ended before a replica could be killed: {job.error!r}"
        committed = commit_records(out)
        if not committed:
            return None
        for shard, attempt, pid in faults.running():
            if shard not in committed and psutil.pid_exists(pid):
                return shard, attempt, pid
        return None

    shard, attempt, pid = wait_for(victim, 120, "a committed shard and a replica in the middle of another")
    replica = psutil.Process(pid)
    # Ours, and a replica: our Ray gave it the fault dir, and Ray named it after the actor.
    assert replica.environ().get(FAULTS_ENV) == str(faults.dir)
    assert replica.cmdline()[0].startswith("ray::Replica"), replica.cmdline()
    replica.kill()
    replica.wait(60)

    record, error = job.join(240)
    assert error is None, f"job failed: {error!r}"
    assert record.state == "succeeded"
    assert record.model["replica"]["engine"] == engine
    result = check_output(out, _ids(40))
    assert ("end", shard, attempt, pid) not in faults.events(), "the replica finished the shard before the kill"
    assert result.commits[shard]["attempt"] != attempt, "the killed attempt was committed"
    assert result.commits[shard]["attempts"] >= 2
    c = result.record["counts"]
    assert c["shards_retried"] >= 1
    assert c["shards_committed"] == c["shards_total"] == 4
    assert c["rows_done"] == 40 == len(result.data)


def test_replica_dies_between_progress_and_result(fault_ray, faults, tiny_model, tmp_path):
    """A replica that dies after telling the driver a shard's rows left its engine, before the
    shard's result: only a result is committed, so the shard runs again elsewhere, and the slot
    it held is gone with its replica. Every row lands once."""
    write_prompts(tmp_path / "in" / "p.parquet", 40)
    out = str(tmp_path / "out")
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in"),
            out,
            tiny_model,
            generation={"max_new_tokens": 16},
            resources={"replicas": 2, "batch_size": 2, "num_cpus": 1},
        )
    )
    # Shard 1's first attempt only: its replica exits between the progress and the result.
    faults.rule("replica.after_generate", action="exit", when={"shard": 1, "attempt": {"contains": "attempt-1-"}})

    from jobs.driver import run_job

    record = run_job(spec, progress=False)
    assert record.state == "succeeded"
    result = check_output(out, _ids(40))
    [died] = [e for e in faults.trace() if e["point"] == "replica.after_generate" and e["shard"] == 1
              and e["attempt"].startswith("attempt-1-")]
    assert ("end", 1, died["attempt"], died["pid"]) not in faults.events(), "the replica got past the fault"
    assert result.commits[1]["attempt"] != died["attempt"] and result.commits[1]["attempts"] >= 2
    c = result.record["counts"]
    assert c["shards_retried"] >= 1 and c["shards_committed"] == c["shards_total"] == 4 and c["rows_done"] == 40


def test_shard_always_fails(fault_ray, faults, tiny_model, tmp_path, ray_tmpdirs):
    write_prompts(tmp_path / "in" / "p.parquet", 40)
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"),
        out,
        tiny_model,
        generation={"max_new_tokens": 16},
        resources={"replicas": 1, "batch_size": 4, "num_cpus": 1},
        shards={"rows_per_shard": 10, "max_attempts": 3},
    )
    spec = spec_from_dict(data)
    faults.fail_shard(2, mode="raise_after")  # as long as a good shard: the others get to finish

    from jobs.driver import run_job

    with pytest.raises(JobError) as failure:
        run_job(spec, progress=False)
    message = str(failure.value)
    assert "part-00002" in message and "3 times" in message, message
    assert "RuntimeError: injected fault at replica.shard_end" in message, message

    record = read_record(out)
    assert record["state"] == "failed"
    assert "part-00002" in record["error"]["message"] and "injected fault" in record["error"]["message"]
    assert record["counts"]["shards_retried"] >= 2
    committed = commit_records(out)
    assert 2 not in committed
    assert {0, 1} <= set(committed), f"shards before the bad one should be committed: {sorted(committed)}"
    assert record["counts"]["shards_committed"] == len(committed)
    kept = {}
    for index, doc in committed.items():
        path = tmp_path / "out" / doc["data"]
        assert pq.read_table(path).num_rows == doc["rows_done"] == 10
        kept[index] = (doc["attempt"], hashlib.sha256(path.read_bytes()).hexdigest())
    failing_starts = [e for e in faults.events() if e[0] == "start" and e[1] == 2]
    assert len(failing_starts) == 3

    # The fault gone (a new Ray, started by `bulkgen run`, without the fault directory): the same spec resumes.
    faults.clear()
    done = run_cli("run", str(write_job(tmp_path / "job.yaml", data)), "--no-progress", env=cli_env(ray_tmpdirs()))
    assert done.returncode == 0, done.stderr[-3000:]
    result = check_output(out, _ids(40))
    assert result.record["state"] == "succeeded"
    for index, (attempt, digest) in kept.items():
        assert result.commits[index]["attempt"] == attempt, f"shard {index} was redone"
        assert hashlib.sha256((tmp_path / "out" / result.commits[index]["data"]).read_bytes()).hexdigest() == digest
    assert len(result.record["runs"]) == 2


def test_shard_kills_its_replica(fault_ray, faults, tiny_model, tmp_path):
    """A shard whose replica process exits whenever it runs: the job fails naming that shard,
    and the shards that merely shared the dying replica are still committed."""
    write_prompts(tmp_path / "in" / "p.parquet", 30)
    out = str(tmp_path / "out")
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in"),
            out,
            tiny_model,
            generation={"max_new_tokens": 16},
            resources={"replicas": 1, "batch_size": 4, "num_cpus": 1},
            shards={"rows_per_shard": 10, "max_attempts": 3},
        )
    )
    faults.fail_shard(0, mode="exit")  # dies at once, with shard 1 in flight beside it

    from jobs.driver import run_job

    with pytest.raises(JobError) as failure:
        run_job(spec, progress=False)
    message = str(failure.value)
    assert "replica died" in message, message
    assert sorted(commit_records(out)) == [1, 2], "shards that shared the dying replica were not committed"
    assert "part-00000" in message, f"the job blamed another shard: {message}"


def test_storage_flaky(fault_ray, faults, tiny_model, tmp_path, monkeypatch):
    # Every path's first write, and every destination's first move, resets the connection:
    # in the replicas (the fault Ray's workers) and in the driver (this process).
    faults.flaky_storage()
    monkeypatch.setenv(FAULTS_ENV, str(faults.dir))
    table = pq.read_table(write_prompts(tmp_path / "in" / "p.parquet", 30))
    prompts = table.column("prompt").to_pylist()
    prompts[3] = None  # an error row, so shard 0 has an errors/ file to write and move
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    out = str(tmp_path / "out")
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in"),
            out,
            tiny_model,
            generation={"max_new_tokens": 8},
            resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
            shards={"rows_per_shard": 10, "max_failed_fraction": 0.1},
        )
    )

    from jobs.driver import run_job

    record = run_job(spec, progress=False)
    assert record.state == "succeeded"
    result = check_output(out, _ids(30))
    assert [(r["id"], r["error_code"]) for r in result.errors] == [("row-00003", "empty_prompt")]
    assert result.record["counts"]["rows_failed"] == 1

    failed = faults.flaky_failures()
    root = f"{tmp_path}/out/"

    def failed_on(point: str, suffix: str) -> list[str]:
        return [f["key"] for f in failed if f["point"] == point and f["key"].startswith(root) and f["key"].endswith(suffix)]

    # Each kind of write really failed once and was retried: the replicas' staged files,
    # the driver's moves into data/ and errors/, the commit records and the job record.
    assert len(failed_on("storage.write", "/data.parquet")) >= 3, failed
    assert len(failed_on("storage.write", "/errors.parquet")) >= 1, failed
    assert sorted(failed_on("storage.move", ".parquet")) == sorted(
        [f"{root}data/part-0000{i}.parquet" for i in range(3)] + [f"{root}errors/part-00000.parquet"]
    )
    assert len(failed_on("storage.write", ".json")) >= 3 + 1  # three commit records and the job record at least
    assert failed_on("storage.write", "_job.json") and failed_on("storage.write", "_commits/part-00002.json")
    # Failures came from both sides: the driver (this process) and the replicas.
    import os

    pids = {f["pid"] for f in failed}
    assert os.getpid() in pids and len(pids) >= 2
