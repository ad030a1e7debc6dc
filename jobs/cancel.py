"""Cancel requests: the _CANCEL file `bulkgen cancel` writes and the driver polls.

A cancel can race the job's end: the driver may finish between the moment
`bulkgen cancel` reads the record and the moment it writes _CANCEL. So the
request is written, then the record read again: a job that ended meanwhile
gets its request withdrawn and the user is told it had already ended. The
other order (written while the record said running, the driver finishing
before its next poll) leaves a _CANCEL beside _SUCCESS; readers take that
as no request (`cancel_requested`), and the job's next run removes it.
"""

from __future__ import annotations

from jobs.core.errors import OutputError
from jobs.core.layout import CANCEL, RECORD, SUCCESS
from jobs.core.times import now
from jobs.record_file import parse_record, read_record_doc


def write_request(out) -> None:
    """Ask the driver writing `out` (a jobs.output.OutputDir) to stop, if its job has not ended."""
    state = _state(out)
    if state.final:
        raise OutputError(f"the job in {out.uri} is already {state.value}; there is nothing to cancel")
    out.write_json(CANCEL, {"requested_at": now()})


def withdraw_if_ended(out) -> None:
    """After write_request: if the job ended meanwhile, remove the request and say so."""
    state = _state(out)
    if state.final or out.exists(SUCCESS):
        out.remove(CANCEL)
        raise OutputError(f"the job in {out.uri} ended ({state.value}) before the cancel arrived; nothing to cancel")


def cancel_requested(out) -> bool:
    """Whether a cancel request stands: a _CANCEL beside _SUCCESS is a request that came too late."""
    return out.exists(CANCEL) and not out.exists(SUCCESS)


def _state(out):
    doc = read_record_doc(out)
    if doc is None:
        raise OutputError(f"no job record ({RECORD}) under {out.uri}: not a bulkgen job output")
    return parse_record(doc, out.url(RECORD)).state
