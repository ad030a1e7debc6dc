"""`bulkgen` command line: run, resume, status, cancel, validate, retry-failed.

Exit codes: 0 success, 1 the job failed (or an internal error: its traceback
is in the log), 2 bad input or usage (jobs.core.errors.BadInput), 130 cancelled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from jobs.core.errors import BadInput
from jobs.core.spec import load_spec

log = logging.getLogger("bulkgen")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from jobs.driver import JobCancelled, JobError

    try:
        return args.func(args)
    except BadInput as e:
        print(f"bulkgen: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobCancelled as e:
        print(f"bulkgen: cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except JobError as e:
        print(f"bulkgen: job failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a bug, or storage that failed for good: not the user's input
        log.exception("internal error")
        print(f"bulkgen: internal error: {type(e).__name__}: {e} (traceback above)", file=sys.stderr)
        return EXIT_FAILED


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

    resume = sub.add_parser("resume", help="resume a job from its output's record")
    resume.add_argument("output_uri")
    _add_cluster_args(resume)
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    resume.set_defaults(func=_cmd_resume)

    status = sub.add_parser("status", help="state and counts of a job")
    status.add_argument("output_uri")
    status.add_argument("--json", action="store_true", help="print the whole record as JSON")
    status.set_defaults(func=_cmd_status)

    cancel = sub.add_parser("cancel", help="ask a running job to stop; committed shards are kept")
    cancel.add_argument("output_uri")
    cancel.set_defaults(func=_cmd_cancel)

    validate = sub.add_parser("validate", help="check a job without running it")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.add_argument("--max-rows", type=int, help="scan at most this many prompts (default: all)")
    validate.set_defaults(func=_cmd_validate)

    retry = sub.add_parser("retry-failed", help="generate a finished job's dead letters (errors/) again")
    retry.add_argument("output_uri")
    _add_cluster_args(retry)
    retry.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="e.g. resources.batch_size=1; fields that change the output are refused")
    retry.set_defaults(func=_cmd_retry_failed)
    return p


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_run(args) -> int:
    from jobs.driver import run_job

    spec = load_spec(args.spec, args.overrides)
    record = run_job(spec, address=args.address, overwrite=args.overwrite, progress=not args.no_progress)
    _print_done(spec.output.uri, spec.output.storage_options, record)
    return 0


def _cmd_resume(args) -> int:
    from jobs.driver import resume_spec, run_job

    spec = resume_spec(args.output_uri, args.overrides)
    record = run_job(spec, address=args.address, progress=not args.no_progress)
    _print_done(spec.output.uri, spec.output.storage_options, record)
    return 0


def _cmd_status(args) -> int:
    import json

    from jobs.output import read_record
    from jobs.record import JobState, driver_alive, format_status

    record = read_record(args.output_uri)
    doc = record.to_json()
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(format_status(record, args.output_uri))
        if record.state is JobState.RUNNING and not driver_alive(doc):
            print("warning:  its driver is gone (killed?); `bulkgen resume` finishes the job")
    return EXIT_FAILED if record.state is JobState.FAILED else 0


def _cmd_cancel(args) -> int:
    from jobs.driver import request_cancel

    request_cancel(args.output_uri)
    print(f"cancel requested; the driver stops within seconds and marks {args.output_uri} cancelled")
    return 0


def _cmd_validate(args) -> int:
    from jobs.validate import validate_report

    report = validate_report(load_spec(args.spec, args.overrides), max_rows=args.max_rows)
    print(report.render())
    return 0


def _cmd_retry_failed(args) -> int:
    from jobs.driver import resume_spec, run_job

    spec = resume_spec(args.output_uri, args.overrides)
    record = run_job(spec, address=args.address, progress=not args.no_progress, retry_failed=True)
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
    from jobs.core.storage import read_parquet
    from jobs.output import OutputDir

    out = OutputDir(uri, storage_options)
    manifest = out.read_json(MANIFEST) or {}
    samples = []
    for entry in manifest.get("shards", []):
        table = read_parquet(out.url(entry["data"]), storage_options)
        for row in table.slice(0, k - len(samples)).to_pylist():
            samples.append(f"{row.get('prompt', '[prompt not included]')}\n  -> {row['text']}")
        if len(samples) >= k:
            break
    return samples


if __name__ == "__main__":
    sys.exit(main())
