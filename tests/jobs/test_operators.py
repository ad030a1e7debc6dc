"""The operators' commands (status, logs, cancel, report, resume, retry-failed) without Ray:
storage options given on the command line, outputs that are not outputs (a file, a
broken _job.json, a truncated data file), a cancel that races the job's end, no
credential in any log, and `submit` waiting for a job agent that is still starting."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.core.errors import OutputError
from jobs.core.layout import CANCEL, RECORD, SUCCESS, OutputLayout
from jobs.core.spec import spec_from_dict
from jobs.core.storage import read_bytes, write_bytes
from jobs.output import OutputDir
from jobs.record import JobState
from jobs.run_log import RunLog
from tests.conftest import job_dict
from tests.jobs.test_report import make_output

KEY_ID = "AKIAOPSTESTKEY7Q3ZX"
SECRET = "opsSecretAccessKey/9f8e7d6c5b4a"
TOKEN = "FwoGZXIvYXdzEOPSSESSIONTOKEN0123456789abcdef"


def _endpoint_args(s3) -> list[str]:
    return ["--storage-option", f"client_kwargs.endpoint_url={s3['options']['client_kwargs']['endpoint_url']}"]


def _s3_output(s3, tmp_path: Path, state: JobState = JobState.SUCCEEDED) -> str:
    """An output on the S3 server whose record holds a spec that resume can load
    (its input is a local directory that does not exist: a resume stops at validation)."""
    uri = f"s3://{s3['bucket']}/out"
    made = make_output(uri, state=state, storage_options=s3["options"])["record"]
    made["spec"] = job_dict(str(tmp_path / "no-input"), uri, tmp_path / "no-model")
    made["fingerprint"] = spec_from_dict(made["spec"]).fingerprint()
    write_bytes(f"{uri}/{RECORD}", json.dumps(made).encode(), s3["options"])
    write_bytes(f"{uri}/_logs/run-1.log", b"12:00:00 INFO jobs.driver: committed part-00000\n", s3["options"])
    return uri


@pytest.fixture
def no_endpoint_env(monkeypatch):
    """Only the command line's options can reach the S3 server."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # unreachable AWS fails fast instead of retrying
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# -- 1. --storage-option and --set output.storage_options, applied before anything is read -----------


def test_status_logs_report_cancel_reach_s3_through_storage_options(s3, tmp_path, no_endpoint_env, capsys):
    uri = _s3_output(s3, tmp_path, JobState.RUNNING)
    assert main(["status", uri, *_endpoint_args(s3)]) == 0
    assert "state:    running" in capsys.readouterr().out
    assert main(["status", uri, "--json", *_endpoint_args(s3)]) == 0
    assert json.loads(capsys.readouterr().out)["request_counts"]["total"] == 120
    assert main(["logs", uri, *_endpoint_args(s3)]) == 0
    assert "committed part-00000" in capsys.readouterr().out
    assert main(["report", uri, *_endpoint_args(s3)]) == 0
    assert fsspec.filesystem("s3", **s3["options"]).exists(f"{s3['bucket']}/out/_report/index.html")
    assert main(["cancel", uri, *_endpoint_args(s3)]) == 0
    assert fsspec.filesystem("s3", **s3["options"]).exists(f"{s3['bucket']}/out/{CANCEL}")


@pytest.mark.parametrize("command", ["resume", "retry-failed"])
@pytest.mark.parametrize("how", ["--storage-option", "--set"])
def test_resume_reads_the_record_with_the_options_given(s3, tmp_path, no_endpoint_env, capsys, command, how):
    uri = _s3_output(s3, tmp_path)
    endpoint = s3["options"]["client_kwargs"]["endpoint_url"]
    given = (_endpoint_args(s3) if how == "--storage-option"
             else ["--set", f"output.storage_options.client_kwargs.endpoint_url={endpoint}"])  # fmt: skip
    # The record was read and the run began: it stops at the missing input, before Ray.
    assert main([command, uri, *given]) == 2
    err = capsys.readouterr().err
    assert "no-input" in err or "no-model" in err, err
    record = json.loads(read_bytes(f"{uri}/{RECORD}", s3["options"]))
    assert record["state"] == "failed" and record["error"]["where"] == "validating"


def test_storage_option_values_are_yaml_scalars_and_text_stays_as_written():
    from jobs.storage_options import parse

    assert parse(["anon=true", "client_kwargs.endpoint_url=http://h:9000", "client_kwargs.region_name=eu",
                  "secret=a #b", "default_block_size=5"]) == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://h:9000", "region_name": "eu"},
        "secret": "a #b", "default_block_size": 5}  # fmt: skip


@pytest.mark.parametrize("bad", ["anon", "=1", "a..b=1", "x.=1"])
def test_a_malformed_storage_option_is_exit_2_naming_it(tmp_path, capsys, bad):
    assert main(["status", str(tmp_path), "--storage-option", bad]) == 2
    assert f"--storage-option {bad!r}" in capsys.readouterr().err


# -- 2. no credential in any log --------------------------------------------------------------------


def _bulkgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_debug_logs_on_s3_never_show_credentials(s3, tmp_path):
    endpoint = s3["options"]["client_kwargs"]["endpoint_url"]
    fs = fsspec.filesystem("s3", **s3["options"])
    with fs.open(f"{s3['bucket']}/in/p.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "topic": ["t", "t"]}), f)
    uri = _s3_output(s3, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
    spec = job_dict(f"s3://{s3['bucket']}/in", f"s3://{s3['bucket']}/new", tmp_path / "no-model",
                    input={"storage_options": s3["options"]}, output={"storage_options": s3["options"]})
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    for args in (["validate", str(tmp_path / "job.yaml")], ["status", uri, "--storage-option",
                                                            f"client_kwargs.endpoint_url={endpoint}"]):
        done = _bulkgen("--log-level", "debug", *args, env=env)
        assert "DEBUG botocore" in done.stderr, done.stderr[-3000:]  # the storage libraries did log
        for secret in (KEY_ID, SECRET, TOKEN):
            assert secret not in done.stderr and secret not in done.stdout, f"{args[0]} printed a credential"
        assert "<redacted>" in done.stderr


def test_the_run_log_never_keeps_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    from jobs import redact

    redact.remember({"key": KEY_ID, "client_kwargs": {"aws_secret_access_key": SECRET}})
    with RunLog(str(tmp_path), {}, run=1):
        logging.getLogger("botocore.endpoint").warning("request headers %s", {"X-Amz-Security-Token": TOKEN})
        logging.getLogger("jobs.driver").info("storage options key=%s secret=%s", KEY_ID, SECRET)
        try:
            raise OSError(f"denied for {KEY_ID}")
        except OSError:
            logging.getLogger("s3fs").exception("failed")
    text = (tmp_path / "_logs" / "run-1.log").read_text()
    assert "storage options" in text and "denied for" in text and "<redacted>" in text
    for secret in (KEY_ID, SECRET, TOKEN):
        assert secret not in text


# -- 3. submit waits for a job agent that is still starting -------------------------------------------


def test_submit_waits_for_the_job_agent_and_only_for_it(capsys):
    from jobs.submit import when_agent_ready

    calls = []

    def starting_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("Request failed with status code 503: No available agent to submit job, "
                               "please try again later..")
        return "raysubmit"

    assert when_agent_ready(starting_twice, timeout=30, poll_s=0.01) == "raysubmit" and len(calls) == 3
    assert "job agent is still starting" in capsys.readouterr().err

    def refused():
        calls.append(1)
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    calls.clear()
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        when_agent_ready(refused, timeout=30, poll_s=0.01)
    assert len(calls) == 1  # any other error is not waited out

    def never_ready():
        raise RuntimeError("No available agent to submit job, please try again later.")

    with pytest.raises(RuntimeError, match="No available agent"):
        when_agent_ready(never_ready, timeout=0.2, poll_s=0.01)  # bounded


# -- 4. a cancel that races the job's end --------------------------------------------------------


def test_a_cancel_written_as_the_job_ends_is_withdrawn(tmp_path):
    from jobs import cancel  # here: a module the fix added, so each test fails alone on the old code

    uri = str(tmp_path / "out")
    make_output(uri, state=JobState.RUNNING, pid=os.getpid())
    out = OutputDir(uri, {})
    cancel.write_request(out)  # the record said running
    make_output(uri, state=JobState.SUCCEEDED)  # the driver finishes before its next poll
    write_bytes(out.url(SUCCESS), b"{}", {})
    with pytest.raises(OutputError, match="ended .succeeded. before the cancel arrived"):
        cancel.withdraw_if_ended(out)
    assert not (tmp_path / "out" / CANCEL).exists()


def test_a_cancel_beside_success_is_no_request(tmp_path, capsys):
    from jobs import cancel  # here: a module the fix added, so each test fails alone on the old code

    uri = str(tmp_path / "out")
    make_output(uri, state=JobState.SUCCEEDED)
    out = OutputDir(uri, {})
    write_bytes(out.url(CANCEL), b"{}", {})  # left by a cancel that lost the race the other way
    write_bytes(out.url(SUCCESS), b"{}", {})
    assert not cancel.cancel_requested(out)
    assert main(["cancel", uri]) == 2
    assert "already succeeded" in capsys.readouterr().err


def test_cancel_of_a_running_job_stands(tmp_path):
    from jobs import cancel  # here: a module the fix added, so each test fails alone on the old code

    uri = str(tmp_path / "out")
    make_output(uri, state=JobState.RUNNING, pid=os.getpid())
    assert main(["cancel", uri]) == 0
    assert cancel.cancel_requested(OutputDir(uri, {}))


# -- 5, 6. a file, or a _job.json that is no job record -----------------------------------------


@pytest.mark.parametrize("command", ["status", "logs", "report", "cancel", "resume"])
@pytest.mark.parametrize("kind", ["yaml", "parquet"])
def test_a_file_instead_of_an_output_is_exit_2(tmp_path, capsys, command, kind):
    path = tmp_path / f"job.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"id": ["a"]}), path)
    else:
        path.write_text("name: x\n")
    assert main([command, str(path)]) == 2
    assert f"{path} is a file, not a job's output directory" in capsys.readouterr().err


BROKEN = {
    "truncated": lambda text: text[: len(text) // 2],
    "state banana": lambda text: json.dumps({**json.loads(text), "state": "banana"}),
    "counts a string": lambda text: json.dumps({**json.loads(text), "counts": {"rows_done": "12"}}),
    "no spec": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "spec"}),
    "a list": lambda text: "[1, 2]",
    "runs not a list": lambda text: json.dumps({**json.loads(text), "runs": "yesterday"}),
}


@pytest.mark.parametrize("command", ["status", "logs", "report", "cancel", "resume", "retry-failed", "run"])
@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_record_is_exit_2_naming_it_and_nothing_is_deleted(tmp_path, capsys, command, broken):
    uri = str(tmp_path / "out")
    make_output(uri, state=JobState.SUCCEEDED)
    record = tmp_path / "out" / RECORD
    record.write_text(BROKEN[broken](record.read_text()))
    before = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    if command == "run":
        (tmp_path / "job.yaml").write_text(json.dumps(job_dict(str(tmp_path / "in"), uri, tmp_path / "model")))
        argv = ["run", str(tmp_path / "job.yaml")]
    else:
        argv = [command, uri]
    assert main(argv) == 2
    assert f"{record}: {RECORD} is not a bulkgen job record: " in capsys.readouterr().err
    assert sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) == before


# -- 7. a truncated data file ---------------------------------------------------------------------


def test_report_names_a_truncated_data_file(tmp_path, capsys):
    uri = str(tmp_path / "out")
    make_output(uri)
    part = tmp_path / "out" / OutputLayout.data(1)
    part.write_bytes(part.read_bytes()[:300])
    assert main(["report", uri]) == 0
    printed = capsys.readouterr().out
    assert "1 committed file(s) could not be read" in printed and "part-00001.parquet" in printed
    assert "part-00001.parquet" in (tmp_path / "out" / "_report" / "index.html").read_text()
