"""`bulkgen` command line: run, submit, resume, status, logs, cancel, validate, report, retry-failed, k8s.

Exit codes: 0 success, 1 the job failed (or an internal error: its traceback
is in the log), 2 bad input or usage (jobs.core.errors.BadInput), 130 cancelled.

status, logs and cancel take a job's output URI (any job, run or submitted) or
the id `bulkgen submit` printed (with --address, as `ray job status` does).

Over 300 lines because the arguments of every command but one are declared
here, in one parser; each command's body is a few lines that call the module
doing the work. `bulkgen k8s` declares its own (jobs/k8s.py's add_parser), beside
the manifests it renders.
"""

from __future__ import annotations

import time

_IMPORTED_AT = time.time()  # before the imports below: process_started where /proc cannot say

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

from jobs.core.errors import BadInput  # noqa: E402
from jobs.core.spec import load_spec  # noqa: E402

log = logging.getLogger("bulkgen")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from jobs import redact

    redact.install(logging.getLogger().handlers)  # no credential reaches the console, at any level
    from jobs.driver import JobCancelled, JobError

    try:
        return args.func(args)
    except BadInput as e:
        print(f"bulkgen: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobCancelled as e:
        print(f"bulkgen: cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the job had a record to say so
        print("bulkgen: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except JobError as e:
        print(f"bulkgen: job failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a bug, or storage that failed for good: not the user's input
        log.exception("internal error")
        print(f"bulkgen: internal error: {type(e).__name__}: {e} (traceback above)", file=sys.stderr)
        return EXIT_FAILED


def process_started() -> str:
    """When this process started (the record's timeline.process_started), as /usr/bin/time
    counts it: Linux's start time of the process, which a launcher's exec (a pyenv shim)
    keeps; elsewhere, when this module was first imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        started = _IMPORTED_AT
    return datetime.fromtimestamp(min(started, _IMPORTED_AT), timezone.utc).isoformat(timespec="milliseconds")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bulkgen", description="Batch text generation with Ray and transformers.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job (resumes if its output already has committed shards)")
    run.add_argument("spec", help="job spec YAML file")
    _add_cluster_args(run)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a spec field, e.g. --set generation.max_new_tokens=64 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="delete another job's results in the output first")
    run.set_defaults(func=_cmd_run)

    submit = sub.add_parser("submit", help="run a job's driver on a Ray cluster (a Ray Job) and return at once")
    submit.add_argument("spec", help="job spec YAML file")
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 "
                        "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a spec field (repeatable)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the driver and its replicas (repeatable)")
    submit.set_defaults(func=_cmd_submit)

    resume = sub.add_parser("resume", help="resume a job from its output's record")
    resume.add_argument("output_uri")
    _add_cluster_args(resume)
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    _add_storage_args(resume)
    resume.set_defaults(func=_cmd_resume)

    status = sub.add_parser("status", help="state and counts of a job")
    _add_target_args(status)
    status.add_argument("--json", action="store_true", help="print the whole record as JSON")
    status.set_defaults(func=_cmd_status)

    logs = sub.add_parser("logs", help="a job's driver log (a submission's, or a run's copy in _logs/)")
    _add_target_args(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--run", type=int, help="which run's log, from the output (default: the latest)")
    logs.set_defaults(func=_cmd_logs)

    cancel = sub.add_parser("cancel", help="ask a running job to stop; committed shards are kept")
    _add_target_args(cancel)
    cancel.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="for a submission: how long the driver gets to stop by itself before Ray stops it")
    cancel.set_defaults(func=_cmd_cancel)

    validate = sub.add_parser("validate", help="check a job without running it")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.add_argument("--max-rows", type=int, help="scan at most this many prompts (default: all)")
    validate.set_defaults(func=_cmd_validate)

    report = sub.add_parser("report", help="build a job's report (OUTPUT_URI/_report/index.html), also while it runs")
    report.add_argument("output_uri")
    _add_storage_args(report)
    report.add_argument("--open", action="store_true", help="open index.html in the web browser")
    report.add_argument("--sample", type=int, default=None, metavar="ROWS",
                        help="texts read for repeats and diversity (default 2000)")
    report.set_defaults(func=_cmd_report)

    retry = sub.add_parser("retry-failed", help="generate a finished job's dead letters (errors/) again")
    retry.add_argument("output_uri")
    _add_cluster_args(retry)
    retry.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="e.g. resources.batch_size=1; fields that change the output are refused")
    _add_storage_args(retry)
    retry.set_defaults(func=_cmd_retry_failed)
    from jobs.k8s import add_parser as _add_k8s_parser
    _add_k8s_parser(sub)
    return p


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="OUTPUT_URI|SUBMISSION_ID", help="the job's output, or its submission id")
    p.add_argument("--address", help="for a submission id: the cluster's dashboard, e.g. http://HEAD:8265")
    _add_storage_args(p)


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec storage option of the output, applied before it is read; nested keys with dots, "
                   "e.g. client_kwargs.endpoint_url=http://HOST:9000 (repeatable)")


def _storage(args) -> dict:
    """The output's storage options given on the command line (--storage-option)."""
    from jobs import redact
    from jobs.storage_options import parse

    options = parse(args.storage_options)
    redact.remember(options)
    return options


def _remember_secrets(spec) -> None:
    """Every storage option value of the spec is kept out of the logs."""
    from jobs import redact

    for section in (spec.input, spec.output, spec.cache):
        if section is not None:
            redact.remember(section.storage_options)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _stop_on_sigterm() -> None:
    """`ray job stop`, Kubernetes and schedulers stop a driver with SIGTERM: treat it as
    Ctrl-C, so the record says cancelled and the job resumes later."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _cmd_run(args) -> int:
    from jobs.driver import run_job

    _stop_on_sigterm()
    spec = load_spec(args.spec, args.overrides)
    _remember_secrets(spec)
    record = run_job(spec, address=args.address, overwrite=args.overwrite, progress=not args.no_progress,
                     started_at=process_started())
    _print_done(spec.output.uri, spec.output.storage_options, record)
    return 0


def _cmd_resume(args) -> int:
    from jobs.driver import resume_spec, run_job

    _stop_on_sigterm()
    spec = resume_spec(args.output_uri, args.overrides, _storage(args))
    _remember_secrets(spec)
    record = run_job(spec, address=args.address, progress=not args.no_progress, started_at=process_started())
    _print_done(spec.output.uri, spec.output.storage_options, record)
    return 0


def _cmd_submit(args) -> int:
    from jobs.core.errors import SpecError
    from jobs.output import read_record
    from jobs.record_file import NoRecord
    from jobs.submit import submit

    spec = load_spec(args.spec, args.overrides)
    _remember_secrets(spec)
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    try:
        record = read_record(spec.output.uri, spec.output.storage_options)
    except NoRecord:
        record = None  # a new job
    except BadInput:  # a file, or a broken record: the driver would refuse it on the cluster
        raise
    except Exception as e:  # no credentials here, say: the cluster may still have them
        log.warning("cannot read %s from here (%s); submitting without checking it", spec.output.uri, e)
        record = None
    done = submit(spec, spec.model_dump(mode="json"), args.address, record, env)
    sid, where = done.submission_id, f" --address {done.address}"
    print(f"submitted {sid} to {done.address}")
    print(f"  output:  {spec.output.uri}")
    print(f"  follow:  bulkgen logs {sid}{where} --follow")
    print(f"  status:  bulkgen status {sid}{where}")
    print(f"  cancel:  bulkgen cancel {sid}{where}")
    return 0


def _target(args) -> tuple[str, str | None]:
    """(output URI, submission id or None) of a status/logs/cancel target."""
    import os

    target = args.target
    if "://" in target or "/" in target or os.path.exists(target):
        return target, None
    from jobs.submit import output_of

    return output_of(target, args.address), target


def _cmd_status(args) -> int:
    import json

    from jobs.output import read_record
    from jobs.record import JobState, driver_alive, format_status
    from jobs.record_file import NoRecord
    from jobs.submit import status_of

    output, submission = _target(args)
    options = _storage(args)
    if submission:
        ray_status, message = status_of(submission, args.address)
        print(f"submission: {submission}  (Ray job {ray_status}{': ' + message if message else ''})")
    try:
        record = read_record(output, options)
    except NoRecord:
        if submission:  # submitted, its driver not started yet
            print(f"output:   {output} (no record yet)")
            return 0
        raise
    doc = record.to_json()
    if args.json:
        from jobs.batch_output import request_counts

        doc["request_counts"] = request_counts(output, record, options)  # the providers' {total, completed, failed}
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(format_status(record, output))
        if record.state is JobState.RUNNING and not driver_alive(doc):
            print("warning:  its driver is gone (killed?); `bulkgen resume` or `bulkgen submit` finishes the job")
    return EXIT_FAILED if record.state is JobState.FAILED else 0


def _cmd_logs(args) -> int:
    from jobs.run_log import print_run_log
    from jobs.submit import print_logs

    output, submission = _target(args)
    options = _storage(args)
    if submission and args.run is None:
        print_logs(submission, args.address, args.follow)
    else:
        print_run_log(output, args.run, args.follow, storage_options=options)
    return 0


def _cmd_cancel(args) -> int:
    from jobs.driver import request_cancel
    from jobs.submit import stop, wait_ended

    output, submission = _target(args)
    options = _storage(args)
    try:
        request_cancel(output, options)
    except Exception as e:  # unreadable output, or the job already ended
        if not submission:
            raise
        log.info("cannot ask through %s (%s); Ray stops the driver instead", output, e)
    else:
        print(f"cancel requested; the driver stops within seconds and marks {output} cancelled")
        if not submission or wait_ended(submission, args.address, args.wait):
            return 0
    if submission and stop(submission, args.address):
        print(f"asked Ray to stop {submission}; its driver records the job cancelled as it exits")
    return 0


def _cmd_validate(args) -> int:
    from jobs.validate import validate_report

    spec = load_spec(args.spec, args.overrides)
    _remember_secrets(spec)
    report = validate_report(spec, max_rows=args.max_rows)
    print(report.render())
    report.check_error_budget()  # exit 2 when the rows found failing would fail the run
    return 0


def _cmd_report(args) -> int:
    from jobs.report import write_report
    from jobs.report.data import SAMPLE_ROWS

    if args.sample is not None and args.sample < 0:
        raise BadInput(f"--sample {args.sample}: give a number of rows, 0 or more")
    options = _storage(args)
    try:
        written = write_report(args.output_uri, options, SAMPLE_ROWS if args.sample is None else args.sample)
    except FileNotFoundError as e:
        raise BadInput(str(e)) from None
    print(f"report:   {written.html}")
    print(f"          {written.markdown}")
    print(f"state:    {written.notice or written.state}")
    if args.open:
        _open_in_browser(written.html, options)
    return 0


def _open_in_browser(url: str, storage_options: dict) -> None:
    """Open a local index.html where it is; a remote one from a local copy (it is self-contained)."""
    import tempfile
    import webbrowser
    from pathlib import Path

    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if "file" not in fs.protocol:
        local = str(Path(tempfile.mkdtemp(prefix="bulkgen-report-")) / "index.html")
        fs.get(path, local)
        path = local
    if not webbrowser.open(Path(path).absolute().as_uri()):
        print(f"no web browser found here; open {path} in one")


def _cmd_retry_failed(args) -> int:
    from jobs.driver import resume_spec, run_job

    _stop_on_sigterm()
    spec = resume_spec(args.output_uri, args.overrides, _storage(args))
    _remember_secrets(spec)
    record = run_job(spec, address=args.address, progress=not args.no_progress, retry_failed=True,
                     started_at=process_started())
    _print_done(spec.output.uri, spec.output.storage_options, record)
    return 0


def _print_done(uri: str, storage_options: dict, record) -> None:
    from jobs.core.layout import DATA, ERRORS

    c = record.counts
    print(f"\nsucceeded: {c.rows_done} rows generated, {c.rows_failed} failed, in {c.shards_total} shards")
    print(f"results:   {uri.rstrip('/')}/{DATA}/")
    if c.rows_failed:
        print(f"errors:    {uri.rstrip('/')}/{ERRORS}/")
    for sample in _samples(uri, storage_options, 3):
        print("\n" + textwrap.indent(sample, "  "))


def _samples(uri: str, storage_options: dict, k: int) -> list[str]:
    from jobs.core.layout import MANIFEST
    from jobs.core.protocol import CommitRecord
    from jobs.core.storage import read_parquet
    from jobs.output import OutputDir

    out = OutputDir(uri, storage_options)
    manifest = out.read_json(MANIFEST) or {}
    samples = []
    for entry in manifest.get("shards", []):
        table = read_parquet(out.url(CommitRecord.from_json(entry).data), storage_options)
        for row in table.slice(0, k - len(samples)).to_pylist():
            samples.append(f"{row.get('prompt', '[prompt not included]')}\n  -> {row['text']}")
        if len(samples) >= k:
            break
    return samples


if __name__ == "__main__":
    sys.exit(main())
