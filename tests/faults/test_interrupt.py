"""Ctrl-C, SIGTERM and `bulkgen cancel` get `bulkgen run` out at any moment of a run,
start-up included.

Each case holds the run at one fault point (jobs/core/faults.py), signals the driver
once the point is reached, and checks that it exits with 130 within a bounded time,
that its record says cancelled (and where), and that the Ray it started is gone."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from tests.conftest import job_dict, write_job, write_prompts
from tests.faults.conftest import Faults, check_output, cli_env, ray_processes, read_record, run_cli
from tests.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.faults]

ROWS = 8
IDS = [f"row-{i:05d}" for i in range(ROWS)]
EXIT_S = 120  # from the signal to the driver's exit, on a loaded 2-core machine
REACH_S = 300  # from the start to the fault point (a local Ray, a replica, a shard)

# moment -> (fault point, its `when`, the signal, the state the record says it was in)
MOMENTS = {
    "validating": ("driver.validate", {}, signal.SIGINT, "validating"),
    "ray.init, SIGINT": ("driver.connect", {}, signal.SIGINT, "running"),
    "ray.init, SIGTERM": ("driver.connect", {}, signal.SIGTERM, "running"),
    "replica starting": ("replica.start", {}, signal.SIGTERM, "running"),
    "generating": ("replica.shard_start", {}, signal.SIGTERM, "running"),
    "finalizing": ("storage.write", {"path": {"contains": "_manifest.json"}}, signal.SIGINT, "finalizing"),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_signal_at_any_moment_ends_the_run_cancelled(
    moment, bulkgen_procs, ray_tmpdirs, fault_ray, tiny_model, tmp_path
):
    point, when, signum, where = MOMENTS[moment]
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    out = str(tmp_path / "out")
    spec = job_dict(str(tmp_path / "in"), out, tiny_model, generation={"max_new_tokens": 4},
                    resources={"replicas": 1, "batch_size": 4, "num_cpus": 1})
    job = write_job(tmp_path / "job.yaml", spec)
    faults = Faults(tmp_path / "faults")
    faults.rule(point, action="hold", timeout=3600, when=when)
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))

    path_contains = (when.get("path") or {}).get("contains", "")

    def reached():
        assert driver.proc.poll() is None, f"the driver exited early:\n{driver.output()[-3000:]}"
        # Ray starts and the replicas load while the driver validates: a moment "running" is
        # signalled once the record says so (the driver waits there for Ray or a replica).
        return faults.reached(point, path_contains) and (where != "running" or read_record(out)["state"] == "running")

    wait_for(reached, REACH_S, f"the run to reach {point}")
    driver.proc.send_signal(signum)
    if point == "driver.connect":  # a ray.init under way is let finish, and the Ray it started stopped
        (faults.dir / f"{point}.release").touch()
    assert driver.wait(EXIT_S) == 130, driver.output()[-3000:]

    record = read_record(out)
    assert record["state"] == "cancelled", (record["state"], record.get("error"))
    assert record["error"] == {"message": "interrupted (Ctrl-C or SIGTERM)", "where": where}
    wait_for(lambda: not ray_processes(ray_tmp), 60, "the interrupted driver's Ray to stop")

    if moment == "finalizing":  # every shard committed: a resume only finalizes
        assert cli_main(["resume", out, "--no-progress"]) == 0
        assert check_output(out, IDS).record["state"] == "succeeded"


def test_bulkgen_cancel_during_start_up_ends_the_run(bulkgen_procs, ray_tmpdirs, fault_ray, tiny_model, tmp_path):
    """A cancel asked while the driver validates is acted on as soon as the run starts, before any shard."""
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    out = str(tmp_path / "out")
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in"), out, tiny_model,
                                                    resources={"replicas": 1, "batch_size": 4, "num_cpus": 1}))
    faults = Faults(tmp_path / "faults")
    faults.rule("driver.validate", action="hold", timeout=3600)
    ray_tmp = ray_tmpdirs()
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmp, faults.dir))
    wait_for(lambda: faults.reached("driver.validate"), REACH_S, "the driver to validate")

    cancel = run_cli("cancel", out)
    assert cancel.returncode == 0, cancel.stderr
    (faults.dir / "driver.validate.release").touch()
    assert driver.wait(EXIT_S) == 130, driver.output()[-3000:]
    record = read_record(out)
    assert record["state"] == "cancelled" and "cancel" in record["error"]["message"], record.get("error")
    assert not any(e["point"] == "replica.shard_start" for e in faults.trace()), "a shard started after the cancel"
    wait_for(lambda: not ray_processes(ray_tmp), 60, "the cancelled driver's Ray to stop")
