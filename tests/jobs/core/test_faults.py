"""The fault-injection points: off without BULKGEN_FAULTS, and each action as documented."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from jobs.core import faults


@pytest.fixture
def fault_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, str(tmp_path))
    return tmp_path


def rule(directory, point: str, **body) -> None:
    (directory / f"{point}.json").write_text(json.dumps(body))


def test_off_without_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    rule(tmp_path, "p", action="raise")
    faults.inject("p", shard=1)  # no directory named: nothing read, nothing raised
    assert not (tmp_path / "trace.jsonl").exists()


def test_raise_only_when_the_rule_matches(fault_dir):
    rule(fault_dir, "p", action="raise", error="ValueError", when={"shard": 2})
    faults.inject("p", shard=1)
    with pytest.raises(ValueError, match="injected fault at p"):
        faults.inject("p", shard=2)
    rule(fault_dir, "q", action="raise", when={"shard": {"min": 3}, "text": {"contains": "POISON"}})
    faults.inject("q", shard=3, text=lambda: "fine")
    faults.inject("q", shard=2, text=lambda: "POISON")
    with pytest.raises(RuntimeError):
        faults.inject("q", shard=4, text=lambda: "a POISONed prompt")


def test_every_call_is_traced_with_its_scalar_context(fault_dir):
    faults.inject("replica.shard_start", shard=7, attempt="attempt-1-x", prompts=lambda: "not traced")
    (entry,) = [json.loads(line) for line in (fault_dir / "trace.jsonl").read_text().splitlines()]
    assert entry["point"] == "replica.shard_start" and entry["pid"] == os.getpid()
    assert entry["shard"] == 7 and entry["attempt"] == "attempt-1-x" and "prompts" not in entry


def test_fail_once_fails_each_key_exactly_once(fault_dir):
    rule(fault_dir, "storage.write", action="fail_once", key="path")
    for path in ("/a", "/b"):
        with pytest.raises(ConnectionResetError):
            faults.inject("storage.write", path=path)
        faults.inject("storage.write", path=path)  # the second time it goes through
    assert len(list((fault_dir / "failed_once").iterdir())) == 2


def test_sleep_scales_with_the_named_context(fault_dir):
    rule(fault_dir, "engine.prefill", action="sleep", seconds=0.05, per="sequences")
    started = time.monotonic()
    faults.inject("engine.prefill", sequences=4)
    assert time.monotonic() - started >= 0.2


def test_hold_waits_for_its_release(fault_dir):
    rule(fault_dir, "replica.shard_start", action="hold", timeout=30)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (faults.inject("replica.shard_start", shard=0), done.set()))
    waiter.start()
    assert not done.wait(0.3), "hold returned before its release"
    (fault_dir / "replica.shard_start.release").touch()
    assert done.wait(60), "hold did not return after its release"
    waiter.join()


def test_unknown_action_is_an_error(fault_dir):
    rule(fault_dir, "p", action="explode")
    with pytest.raises(ValueError, match="unknown fault action 'explode'"):
        faults.inject("p")
