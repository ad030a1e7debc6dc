"""Start-up in parallel: the replicas load while the driver validates, and the job still
ends as it must whatever happens then (a refused model, a Ctrl-C); the record's timeline
says when each step ended. `bulkgen run` subprocesses, each with its own local Ray."""

from __future__ import annotations

import signal

import psutil
import pytest

from jobs.core.times import seconds_between
from jobs.record import TIMELINE
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import Faults, check_output, cli_env, ray_processes, read_record
from tests.tiny_model import save_without_weight
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

ROWS = 8
IDS = [f"row-{i:05d}" for i in range(ROWS)]
REACH_S = 300  # from the start to a fault point, on a loaded 2-core machine
EXIT_S = 120


def _job(tmp_path, model):
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    out = str(tmp_path / "out")
    spec = job_dict(str(tmp_path / "in"), out, model, generation={"max_new_tokens": 4},
                    resources={"replicas": 1, "batch_size": 4, "num_cpus": 1}, shards={"rows_per_shard": 4})
    return write_job(tmp_path / "job.yaml", spec), out, Faults(tmp_path / "faults")


def _replica_started(driver, faults: Faults) -> bool:
    """A replica has started loading; the driver must still be running meanwhile."""
    assert driver.proc.poll() is None, f"the driver exited early:\n{driver.output()[-3000:]}"
    return faults.reached("replica.start")


def test_replicas_load_while_the_driver_validates(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    """Validation held: a replica starts loading meanwhile, no shard runs and the record says
    validating; released, the job succeeds with a timeline in the order of a run."""
    job, out, faults = _job(tmp_path, tiny_model)
    faults.rule("driver.validate", action="hold", timeout=3600)
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmpdirs(), faults.dir))

    wait_for(lambda: _replica_started(driver, faults), REACH_S, "a replica to start while the driver validates")
    assert read_record(out)["state"] == "validating"
    # The Ray that `bulkgen run` starts runs its workers at nice 0, not Ray's 15 (cli_env sets no RAY_*).
    replica = next(e["pid"] for e in faults.trace() if e["point"] == "replica.start")
    assert psutil.Process(replica).nice() == 0
    assert not faults.reached("replica.shard_start")
    (faults.dir / "driver.validate.release").touch()
    assert driver.wait(EXIT_S) == 0, driver.output()[-3000:]
    # Ray's notices that are untrue or idle here (ray.init runs on a thread by design; the
    # local Ray is the run's own) stay out of what the user reads.
    for notice in ("SIGTERM handler is not set", "Token authentication is enabled"):
        assert notice not in driver.output(), driver.output()[-3000:]

    record = check_output(out, IDS).record
    timeline = record["runs"][-1]["timeline"]
    assert set(TIMELINE) - {"ray_stopped", "report_written"} <= set(timeline) <= set(TIMELINE), timeline
    at = {key: seconds_between(timeline["process_started"], stamp) for key, stamp in timeline.items()}
    # Each step after the ones it waits for (Ray and validation run side by side).
    for before, after in [
        ("process_started", "validated"), ("validated", "planned"), ("process_started", "ray_ready"),
        ("ray_ready", "replicas_launched"), ("planned", "first_replica_ready"),
        ("replicas_launched", "first_replica_ready"), ("first_replica_ready", "first_token"),
        ("first_token", "last_commit"), ("last_commit", "finished"), ("finished", "ray_stopped"),
    ]:
        if after in at:
            assert at[before] <= at[after], (before, after, at)
    # The replica was launched before validation ended: the hold kept it from ending.
    assert at["replicas_launched"] < at["validated"], at


def test_a_model_the_replica_refuses_is_bad_input(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    """A ModelError from a replica's engine load (here injected) fails the job as bad input:
    exit 2, the replica's message, before any shard runs."""
    job, out, faults = _job(tmp_path, tiny_model)
    faults.rule("replica.start", action="raise", error="ModelError")
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmpdirs(), faults.dir))
    assert driver.wait(REACH_S) == 2, driver.output()[-3000:]
    assert "injected fault at replica.start" in driver.output()
    record = read_record(out)
    assert record["state"] == "failed" and "injected fault at replica.start" in record["error"]["message"]
    assert not faults.reached("replica.shard_start")


def test_a_checkpoint_missing_weights_fails_the_run_as_bad_input(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    """On its own local Ray, `bulkgen run` leaves the model's check to the replicas: a weight the
    checkpoint lacks is still exit 2 naming the checkpoint and the key, before any shard runs."""
    missing = "model.layers.1.self_attn.q_proj.weight"
    model = save_without_weight(tiny_model, tmp_path / "missing", missing)
    job, out, faults = _job(tmp_path, model)
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmpdirs(), faults.dir))
    assert driver.wait(REACH_S) == 2, driver.output()[-3000:]
    record = read_record(out)
    assert record["state"] == "failed", record
    for fragment in (str(model), missing, "lack 1 parameters"):
        assert fragment in record["error"]["message"] and fragment in driver.output()
    assert not faults.reached("replica.shard_start")


def test_ctrl_c_while_replicas_load_early_ends_cancelled(bulkgen_procs, ray_tmpdirs, tiny_model, tmp_path):
    """Ctrl-C while a replica loads and the driver still validates: cancelled (in validating),
    and the Ray it started, with the replica, is gone."""
    job, out, faults = _job(tmp_path, tiny_model)
    faults.rule("driver.validate", action="hold", timeout=3600)
    faults.rule("replica.start", action="hold", timeout=3600)
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))

    wait_for(lambda: _replica_started(driver, faults), REACH_S, "a replica to start loading")
    driver.proc.send_signal(signal.SIGINT)
    assert driver.wait(EXIT_S) == 130, driver.output()[-3000:]
    record = read_record(out)
    assert record["state"] == "cancelled"
    assert record["error"] == {"message": "interrupted (Ctrl-C or SIGTERM)", "where": "validating"}
    wait_for(lambda: not ray_processes(ray_tmp), 60, "the interrupted driver's Ray to stop")
