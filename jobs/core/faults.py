"""Fault-injection points: the named places where tests make the product fail on purpose.

The product calls `inject("point", **context)` at a few places. With
BULKGEN_FAULTS unset, as in every real job, that is one environment lookup.
With BULKGEN_FAULTS=DIR (tests set it for the driver and every Ray worker),
each call appends {"point", "pid", **context} to DIR/trace.jsonl and then
obeys the rule in DIR/POINT.json, if there is one and its `when` matches:

    {"action": "raise", "error": "RuntimeError"}    raise that error here (also ValueError, ConnectionResetError,
                                                    ModelError)
    {"action": "exit", "code": 17}                  end this process at once, as a crash would
    {"action": "sleep", "seconds": 0.2, "per": "sequences"}  sleep, times context["sequences"] if `per`
    {"action": "hold", "timeout": 300}              wait until DIR/POINT.release exists
    {"action": "fail_once", "key": "path"}          ConnectionResetError the first time each context[key] comes by

    "when": {"shard": 2}, {"shard": {"min": 1}}, {"prompts": {"contains": "POISON"}}

Rules are files, so a test turns faults on and off while a job runs, and
every process sees the same ones. Context values may be callables: they are
evaluated only when a rule's `when` asks for them.

The points:
    replica.start                          a replica actor starts, before its engine loads
    replica.shard_start   shard, attempt   a replica starts generating a shard attempt
    replica.after_generate shard, attempt  its rows left the engine and the driver was told
                                           (ShardProgress); parse, filter and write come next
    replica.shard_end     shard, attempt   its files are staged; it is about to return
    engine.prefill        sequences, prompts (text)   prompts enter the model (transformers: a prefill
                                                      chunk; vLLM: a submitted batch)
    storage.write         path             a whole object is written
    storage.move          path             a staged file is published under this name
    driver.validate                        the driver starts checking input and model (Ray starts
                                           and the replicas launch meanwhile)
    driver.claim          run              the driver is about to create its claim on the output
    driver.connect                         the driver is about to start or join Ray (SIGINT and
                                           SIGTERM are held until ray.init returns)
    committer.before_record shard, attempt  the driver's committer thread is about to commit a
                                           shard whose result came back (its files moved, then its
                                           commit record); the replica already has its next shard
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from jobs.core.errors import ModelError

ENV = "BULKGEN_FAULTS"
_ERRORS = {
    "RuntimeError": RuntimeError,
    "ValueError": ValueError,
    "ConnectionResetError": ConnectionResetError,
    "ModelError": ModelError,  # a model the replica refuses: the job's bad input
}


def inject(point: str, **context) -> None:
    """Obey the fault rule for `point`, if faults are on and one is set."""
    root = os.environ.get(ENV)
    if not root:
        return
    root = Path(root)
    _trace(root, point, context)
    try:
        rule = json.loads((root / f"{point}.json").read_text())
    except FileNotFoundError:
        return
    if all(_matches(want, _value(context.get(key))) for key, want in rule.get("when", {}).items()):
        _act(root, point, rule, context)


def _value(v):
    return v() if callable(v) else v


def _matches(want, got) -> bool:
    if isinstance(want, dict):
        if "min" in want:
            return got is not None and got >= want["min"]
        if "contains" in want:
            return got is not None and want["contains"] in got
    return got == want


def _act(root: Path, point: str, rule: dict, context: dict) -> None:
    action = rule["action"]
    if action == "raise":
        raise _ERRORS[rule.get("error", "RuntimeError")](f"injected fault at {point}")
    if action == "exit":
        os._exit(rule.get("code", 17))
    if action == "sleep":
        time.sleep(rule["seconds"] * (_value(context[rule["per"]]) if "per" in rule else 1))
    elif action == "hold":
        deadline = time.monotonic() + rule.get("timeout", 300)
        while not (root / f"{point}.release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    elif action == "fail_once":
        key = str(_value(context[rule["key"]]))
        marker = root / "failed_once" / hashlib.sha1(f"{point}\x00{key}".encode()).hexdigest()
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: exactly one process, once, gets to fail this key
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            json.dump({"point": point, "key": key, "pid": os.getpid()}, f)
        raise ConnectionResetError(f"injected fault at {point}: connection reset ({key})")
    else:
        raise ValueError(f"{root / point}.json: unknown fault action {action!r}")


def _trace(root: Path, point: str, context: dict) -> None:
    entry = {"point": point, "pid": os.getpid(), "time": time.time()}
    entry.update({k: v for k, v in context.items() if isinstance(v, (str, int, float, bool))})
    # One short O_APPEND write per line: lines from many processes never interleave.
    fd = os.open(root / "trace.jsonl", os.O_CREAT | os.O_APPEND | os.O_WRONLY)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)
