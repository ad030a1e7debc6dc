"""One driver per output: each run claims the output before it reads or writes anything in it.

Run N's claim is `_claims/run-NNNNN.json`, created with an atomic
create-if-absent (jobs/core/storage.create_exclusive). A driver takes the
next number after the latest claim, and only once the latest claim's driver
is gone (released its claim, or its process is dead, or its heartbeat is
stale); of two drivers that race for the same number, the store lets one
create it and the other is refused (exit 2) naming the winner. Numbers are
never reused, so no claim is ever deleted or stolen: a driver that finds a
claim after its own (it was wrongly taken for dead) stops without writing.

On stores without an atomic create (anything but local disks, memory:// and
S3), two drivers starting within the same moment can both pass; the README
says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid

from jobs.core import faults, storage
from jobs.core.errors import OutputError
from jobs.core.layout import CLAIMS, RECORD, OutputLayout
from jobs.core.times import age_seconds, now
from jobs.record import HEARTBEAT_S, process_alive

log = logging.getLogger(__name__)

STALE_AFTER_S = 6 * HEARTBEAT_S  # a driver on another host is taken for dead after this long without a heartbeat


class OutputConflict(OutputError):
    """The output holds another job's committed results, or a live driver writes it."""


class ClaimLost(OutputConflict):
    """A later driver claimed the output while this one ran (it was taken for dead)."""


class OutputClaim:
    """This driver's claim on an output; `release()` it when the run ends."""

    def __init__(self, out, number: int, doc: dict):
        self.out, self.number, self.doc = out, number, doc

    @classmethod
    def acquire(cls, out) -> OutputClaim:
        latest = _latest_claim(out)
        if latest is not None and _holder_alive(out, *latest):
            raise OutputConflict(_held_message(out, *latest))
        number = latest[0] + 1 if latest else 1
        doc = {"run": number, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
               "claimed_at": now(), "released_at": None}  # fmt: skip
        url = out.url(OutputLayout.claim(number))
        faults.inject("driver.claim", run=number)
        if not storage.create_exclusive(url, _encode(doc), out.storage_options):
            other = _read_claim(out, number)
            if other.get("token") != doc["token"]:  # not our own create, retried after a lost reply
                raise OutputConflict(_held_message(out, number, other))
        if not storage.atomic_create(url, out.storage_options):
            log.warning("%s cannot create a file atomically: two drivers started at once may both run", out.uri)
        return cls(out, number, doc)

    def check_still_ours(self) -> None:
        """Raise ClaimLost if a later driver claimed the output (it took this one for dead)."""
        if self.out.exists(OutputLayout.claim(self.number + 1)):
            raise ClaimLost(
                f"another driver claimed {self.out.uri} as run {self.number + 1} while this one (run "
                f"{self.number}) ran, taking it for dead; this driver stops and leaves the output to it"
            )

    def release(self) -> None:
        """The run is over: the next driver may claim the output at once."""
        self.doc["released_at"] = now()
        self.out.write_json(OutputLayout.claim(self.number), self.doc)


def _encode(doc: dict) -> bytes:
    # As OutputDir.write_json writes it; create_exclusive takes the bytes.
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def _read_claim(out, number: int) -> dict:
    try:
        return out.read_json(OutputLayout.claim(number)) or {}
    except ValueError:  # not JSON: being written by hand? Treat as held, so nothing races it
        return {"run": number}


def _latest_claim(out) -> tuple[int, dict] | None:
    numbers = []
    for name in out.list(CLAIMS):
        stem = name.removesuffix(".json")
        if stem.startswith("run-") and stem[4:].isdigit():
            numbers.append(int(stem[4:]))
    if not numbers:
        return None
    return max(numbers), _read_claim(out, max(numbers))


def _holder_alive(out, number: int, doc: dict) -> bool:
    """Whether the driver holding claim `number` may still be running: not released, and
    its process alive (same host) or its heartbeat fresh (another host)."""
    if doc.get("released_at"):
        return False
    alive = process_alive(doc.get("host"), doc.get("pid"))
    if alive is not None:
        return alive
    # Another host: the record's heartbeat, once that run writes it, else the claim's own time.
    beat = doc.get("claimed_at") or "1970-01-01T00:00:00+00:00"
    record = out.read_json(RECORD) or {}
    runs = record.get("runs") or [{}]
    if isinstance(runs[-1], dict) and runs[-1].get("claim") == number and record.get("updated_at"):
        beat = max(beat, record["updated_at"])
    return age_seconds(beat) < STALE_AFTER_S


def _held_message(out, number: int, doc: dict) -> str:
    who = f"pid {doc.get('pid')} on {doc.get('host')}" if doc.get("pid") else "another driver"
    since = doc.get("claimed_at", "unknown")
    return (
        f"{out.uri} is claimed by a running driver (run {number}, {who}, since {since}): one driver per output. "
        f"Wait for it, or `bulkgen cancel {out.uri}`; if that driver is gone for good and this still refuses, "
        f"delete {out.url(OutputLayout.claim(number))}"
    )
