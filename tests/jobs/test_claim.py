"""One driver per output: claims are atomic creates, taken over only from a driver that is gone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest

from jobs.claim import ClaimLost, OutputClaim, OutputConflict
from jobs.core.storage import create_exclusive
from jobs.output import OutputDir


def _racers(out: OutputDir, n: int) -> tuple[list[OutputClaim], list[Exception]]:
    """`n` threads claim `out` at once (a barrier lines them up); what each got."""
    barrier = threading.Barrier(n)
    won, lost = [], []

    def claim():
        barrier.wait()
        try:
            won.append(OutputClaim.acquire(out))
        except OutputConflict as e:
            lost.append(e)

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, lost


@pytest.mark.parametrize("where", ["file", "memory"])
def test_of_drivers_claiming_at_once_exactly_one_wins(where, tmp_path):
    uri = str(tmp_path / "out") if where == "file" else f"memory://claims-{uuid.uuid4().hex}"
    won, lost = _racers(OutputDir(uri, {}), 8)
    assert len(won) == 1 and len(lost) == 7
    assert all("claimed by a running driver (run 1" in str(e) for e in lost)


@pytest.mark.s3
def test_s3_creates_a_claim_with_a_conditional_put(s3):
    url = f"s3://{s3['bucket']}/out/_claims/run-00001.json"
    assert create_exclusive(url, b"{}", s3["options"]) is True
    assert create_exclusive(url, b"{}", s3["options"]) is False  # the server said 412, not s3fs's guess
    won, lost = _racers(OutputDir(f"s3://{s3['bucket']}/race", s3["options"]), 4)
    assert len(won) == 1 and len(lost) == 3


def test_a_released_claim_is_followed_by_the_next_run(tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    first = OutputClaim.acquire(out)
    with pytest.raises(OutputConflict, match="run 1"):
        OutputClaim.acquire(out)  # held, by this very process
    first.release()
    second = OutputClaim.acquire(out)
    assert second.number == 2
    with pytest.raises(ClaimLost):
        first.check_still_ours()
    second.check_still_ours()


def test_the_claim_of_a_dead_driver_is_taken_over(tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = OutputClaim.acquire(out)
    # As a driver killed with SIGKILL leaves it: never released, its pid gone.
    path = tmp_path / "out" / "_claims" / "run-00001.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "pid": int(dead.stdout)}))
    assert OutputClaim.acquire(out).number == 2
    with pytest.raises(ClaimLost):
        claim.check_still_ours()


def test_a_driver_on_another_host_is_alive_while_its_heartbeat_is_fresh(tmp_path):
    out = OutputDir(str(tmp_path / "out"), {})
    OutputClaim.acquire(out)
    path = tmp_path / "out" / "_claims" / "run-00001.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "host": "elsewhere"}))
    with pytest.raises(OutputConflict, match="elsewhere"):
        OutputClaim.acquire(out)
    path.write_text(json.dumps({**doc, "host": "elsewhere", "claimed_at": "2020-01-01T00:00:00+00:00"}))
    assert OutputClaim.acquire(out).number == 2
