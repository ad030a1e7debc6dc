"""Reading an output's _job.json for the operators' commands, refusing what is not one.

status, logs, cancel, report, resume and run all start by reading the record.
A path that is a file (the spec YAML, a Parquet file), a truncated record or
a hand-edited one must be a clear refusal (OutputError, exit 2) naming the
file and what is wrong, never a traceback; and nothing is deleted because of it.
"""

from __future__ import annotations

import json

from jobs.core.errors import OutputError
from jobs.core.layout import RECORD
from jobs.core.storage import read_bytes
from jobs.record import Counts, JobRecord, JobState

class NoRecord(OutputError):
    """The output has no _job.json (yet): a new job, or not a bulkgen output."""


REMEDY = "restore it from a backup, or write the job to another output.uri (committed shards are never deleted for it)"


def read_record_doc(output) -> dict | None:
    """The record of `output` (a jobs.output.OutputDir) as written, checked; None if it has none."""
    url = output.url(RECORD)
    try:
        raw = read_bytes(url, output.storage_options)
    except (FileNotFoundError, NotADirectoryError):
        if _is_file(output):
            raise OutputError(
                f"{output.uri} is a file, not a job's output directory; give the output.uri the job wrote to"
            ) from None
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_a_record(url, f"not valid JSON ({e}); truncated?") from None
    problem = _shape_problem(doc)
    if problem:
        raise _not_a_record(url, problem)
    return doc


def parse_record(doc: dict, url: str) -> JobRecord:
    """A checked record document as a JobRecord."""
    try:
        return JobRecord.from_json(doc)
    except (TypeError, ValueError, KeyError) as e:  # a shape _shape_problem does not know yet
        raise _not_a_record(url, f"{type(e).__name__}: {e}") from None


def _shape_problem(doc) -> str | None:
    """What makes `doc` no job record, or None. Only the fields the commands rely on are checked."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    for name, kind in (("spec", dict), ("fingerprint", str)):
        if name not in doc:
            return f"the field {name!r} is missing"
        if not isinstance(doc[name], kind):
            return f"{name!r} should be a {kind.__name__}, got {doc[name]!r:.80}"
    states = [s.value for s in JobState]
    if "state" in doc and doc["state"] not in states:
        return f"'state' is {doc['state']!r:.80}, not one of {', '.join(states)}"
    counts = doc.get("counts", {})
    if not isinstance(counts, dict):
        return f"'counts' should be an object, got {counts!r:.80}"
    for name, value in counts.items():
        if name in Counts.__dataclass_fields__ and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"'counts.{name}' should be a whole number of 0 or more, got {value!r:.80}"
    runs = doc.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        return f"'runs' should be a list of objects, got {runs!r:.80}"
    for i, run in enumerate(runs):
        pid = run.get("pid")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
            return f"'runs[{i}].pid' should be a process id, got {pid!r:.80}"
    error = doc.get("error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("message"), str)):
        return f"'error' should be null or an object with a message, got {error!r:.80}"
    return None


def _not_a_record(url: str, problem: str) -> OutputError:
    return OutputError(f"{url}: {RECORD} is not a bulkgen job record: {problem}; {REMEDY}")


def _is_file(output) -> bool:
    try:
        return output.fs.isfile(output.root)
    except OSError:
        return False
