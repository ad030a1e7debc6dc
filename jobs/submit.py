"""`bulkgen submit`: run a job's driver on the cluster as a Ray Job, and find it again.

The driver then lives on the cluster's head, not on the submitter's laptop:
closing the laptop ends nothing. What travels with the submission (Ray's
job runtime_env): a working_dir with the job's spec (overrides applied) and
bulkgen's own two packages, so the cluster needs bulkgen's dependencies but
not bulkgen itself. The entrypoint is `python -m jobs.cli run job.yaml`, so a
submitted job commits, resumes and records exactly as `bulkgen run` does.

Submission ids are deterministic: bulkgen-<output>-<spec>-run<N>, where N
is the run the output's record is at. Submitting the same job twice while it
runs gives the same id, and Ray refuses the second (we say so plainly); once
a run has ended (failed, cancelled, or lost with its cluster) the next
submission is the next run, which resumes from the commit log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.core.errors import ClusterError, OutputError
from jobs.core.spec import JobSpec
from jobs.ray_connection import package_dir
from jobs.record import SUBMISSION_ID_ENV, JobRecord, JobState, driver_alive

log = logging.getLogger(__name__)

SPEC_FILE = "job.yaml"
METADATA_OUTPUT = "bulkgen_output"  # submission metadata: the job's output URI
ACTIVE = ("PENDING", "RUNNING")  # Ray's JobStatus values of a submission not yet ended
# A head just started (`ray start --head`) answers on its dashboard before its job agent is up;
# Ray then refuses submissions with this message. The agent comes up within seconds.
AGENT_STARTING = "No available agent to submit job"
AGENT_WAIT_S = 60.0


@dataclass(frozen=True)
class Submitted:
    submission_id: str
    address: str  # the dashboard's URL the client used


def submission_id(spec: JobSpec, run: int) -> str:
    output = hashlib.sha256(spec.output.uri.rstrip("/").encode()).hexdigest()[:8]
    return f"bulkgen-{output}-{spec.fingerprint()[:12]}-run{run}"


def submit(
    spec: JobSpec, spec_data: dict, address: str | None, record: JobRecord | None, env: dict[str, str] | None = None
) -> Submitted:
    """Submit the job's driver; `record` is the output's record when the submitter can read it.
    Raises OutputError (a run is going on) or ClusterError (no cluster there)."""
    if record is not None and record.state is JobState.RUNNING and driver_alive(record.to_json()):
        run = record.run
        raise OutputError(
            f"the job in {spec.output.uri} is running (run {len(record.runs)}, "
            f"{'submission ' + run.submission_id if run.submission_id else f'pid {run.pid} on {run.host}'}); "
            "follow it with `bulkgen status`/`bulkgen logs`, or cancel it first"
        )
    run = len(record.runs) + 1 if record is not None else 1
    sid = submission_id(spec, run)
    with job_client(address) as client:
        active = [
            j for j in client.list_jobs()
            if (j.metadata or {}).get(METADATA_OUTPUT) == spec.output.uri and str(j.status) in ACTIVE
        ]  # fmt: skip
        if active:
            raise OutputError(
                f"submission {active[0].submission_id} for {spec.output.uri} is still {active[0].status}; "
                f"a second driver would race it. Follow it with `bulkgen logs {active[0].submission_id} --follow`"
            )
        with _working_dir(spec_data) as working_dir:
            try:
                when_agent_ready(lambda: client.submit_job(
                    entrypoint=f"python -m jobs.cli --log-level info run {SPEC_FILE} --no-progress",
                    submission_id=sid,
                    runtime_env={"working_dir": working_dir, "env_vars": {**(env or {}), SUBMISSION_ID_ENV: sid}},
                    metadata={METADATA_OUTPUT: spec.output.uri, "bulkgen_name": spec.name or ""},
                ))
            except RuntimeError as e:
                if "already exists" in str(e):
                    raise OutputError(f"job {sid} was already submitted to this cluster; it is the same run") from None
                raise ClusterError(f"the cluster refused the job: {e}") from e
        return Submitted(sid, client.get_address())


def when_agent_ready(call, timeout: float = AGENT_WAIT_S, poll_s: float = 1.0):
    """`call()`, retried while the cluster says its job agent is still starting (and only
    then), for at most `timeout` seconds; says on stderr that it waits."""
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            return call()
        except RuntimeError as e:
            if AGENT_STARTING not in str(e) or time.monotonic() >= deadline:
                raise
            if not waiting:
                print(f"bulkgen: the cluster's job agent is still starting; waiting up to {timeout:.0f}s for it",
                      file=sys.stderr, flush=True)
                waiting = True
        time.sleep(poll_s)


def output_of(submission: str, address: str | None) -> str:
    """The output URI of a bulkgen submission."""
    with job_client(address) as client:
        info = _job_info(client, submission)
    output = (info.metadata or {}).get(METADATA_OUTPUT)
    if not output:
        raise ClusterError(f"submission {submission} is not a bulkgen job (no {METADATA_OUTPUT} in its metadata)")
    return output


def status_of(submission: str, address: str | None) -> tuple[str, str]:
    """Ray's status of a submission and its message."""
    with job_client(address) as client:
        info = _job_info(client, submission)
    return str(info.status), info.message or ""


def stop(submission: str, address: str | None) -> bool:
    """Ask Ray to stop the submission's driver (SIGTERM, then SIGKILL); whether it was running."""
    with job_client(address) as client:
        return client.stop_job(submission)


def print_logs(submission: str, address: str | None, follow: bool) -> None:
    """The driver's stdout and stderr as Ray keeps them; with `follow`, until the job ends."""
    with job_client(address) as client:
        _job_info(client, submission)
        if not follow:
            print(client.get_job_logs(submission), end="")
            return
        import asyncio

        async def tail() -> None:
            async for chunk in client.tail_job_logs(submission):
                print(chunk, end="", flush=True)

        asyncio.run(tail())


@contextmanager
def job_client(address: str | None):
    """Ray's JobSubmissionClient for `address` (a dashboard URL; default RAY_API_SERVER_ADDRESS,
    then RAY_ADDRESS). An explicit address wins over the environment, which Ray's client
    would otherwise prefer. Token auth: the client reads RAY_AUTH_MODE and the token."""
    from ray.job_submission import JobSubmissionClient

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address:
        os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        try:
            client = JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, or Ray's own on a bad address
            where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "(none)"
            raise ClusterError(
                f"cannot reach the Ray dashboard at {where}: {e}\n  pass --address http://HEAD:8265; a cluster with "
                "token auth also needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN)"
            ) from e
        yield client
    finally:
        if address:
            if saved is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved


def _job_info(client, submission: str):
    try:
        return client.get_job_info(submission)
    except RuntimeError as e:
        raise ClusterError(f"no job {submission} on the cluster at {client.get_address()}: {e}") from None


@contextmanager
def _working_dir(spec_data: dict):
    """A directory with the spec and bulkgen's packages, for Ray to upload."""
    with tempfile.TemporaryDirectory(prefix="bulkgen-submit-") as tmp:
        root = Path(tmp)
        (root / SPEC_FILE).write_text(yaml.safe_dump(spec_data, sort_keys=False))
        for package in ("jobs", "workers"):
            shutil.copytree(package_dir(package), root / package, ignore=shutil.ignore_patterns("__pycache__"))
        yield str(root)


def wait_ended(submission: str, address: str | None, timeout: float, poll_s: float = 1.0) -> bool:
    """Whether the submission ended within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with job_client(address) as client:
        while True:
            if client.get_job_status(submission).is_terminal():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
