"""Where a run's time went: `python -m bench.timeline OUTPUT_URI [--run N]` prints the
moments of the job record's run.timeline (jobs/record.py TIMELINE) as seconds after
the process started, one line each, and the steps between them."""

from __future__ import annotations

import argparse

from jobs.core.times import seconds_between
from jobs.output import read_record
from jobs.record import TIMELINE


def timeline_seconds(timeline: dict[str, str]) -> list[tuple[str, float]]:
    """(moment, seconds after process_started) for each moment the run reached, in TIMELINE's order."""
    start = timeline["process_started"]
    return [(key, seconds_between(start, timeline[key])) for key in TIMELINE if key in timeline]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.splitlines()[0])
    p.add_argument("output_uri")
    p.add_argument("--run", type=int, default=0, help="which run of the job (1 = the first; default: the latest)")
    args = p.parse_args(argv)
    record = read_record(args.output_uri, {})
    run = record.runs[args.run - 1 if args.run else -1]
    if "process_started" not in run.timeline:
        raise SystemExit(f"{args.output_uri}: its run has no timeline (written before bulkgen had one)")
    for key, seconds in timeline_seconds(run.timeline):
        print(f"{seconds:7.2f}  {key}")


if __name__ == "__main__":
    main()
