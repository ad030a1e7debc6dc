"""Fault injection for the fault tests; test code only, never imported by the product.

Ray runs `setup` in every worker process it starts (the job's runtime_env
`worker_process_setup_hook`). It patches the replica and the engine so they
consult a fault directory, named by the env var BULKGEN_FAULT_DIR, each time
they run; the test switches faults on and off by writing files there, which
every process sees:

    slow          seconds to sleep per sequence the engine prefills, so shards take long enough to be killed mid-way
    poison        present: a prefill holding a prompt that contains "POISON" raises RuntimeError
    fail_shard    JSON {"index": 2, "mode": ...}: on that shard the replica raises at once ("raise"),
                  raises after generating and staging it ("raise_after"), or dies ("exit")
    hold          JSON {"from_shard": 1}: shards from that index on wait (in the replica) until `release` exists
    events/       the replica writes start~SHARD~ATTEMPT~PID when it begins a shard, end~... when it returns
    flaky/        one marker per path the flaky filesystem has failed once (see FlakyFileSystem)

`runtime_env_hook` gives a `bulkgen` subprocess the same hook through Ray's
RAY_RUNTIME_ENV_HOOK env var, since its driver calls ray.init itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

FAULT_DIR_ENV = "BULKGEN_FAULT_DIR"
SETUP_HOOK = "tests.faults.hooks.setup"
POISON = "POISON"


def fault_dir() -> Path | None:
    where = os.environ.get(FAULT_DIR_ENV)
    return Path(where) if where else None


def _config(name: str) -> str | None:
    d = fault_dir()
    if d is None:
        return None
    try:
        return (d / name).read_text()
    except FileNotFoundError:
        return None


def _event(kind: str, shard: int, attempt: str) -> None:
    d = fault_dir()
    if d is not None:
        (d / "events").mkdir(parents=True, exist_ok=True)
        (d / "events" / f"{kind}~{shard}~{attempt}~{os.getpid()}").touch()


# -- the flaky filesystem ----------------------------------------------------------


class FlakyFileSystem(LocalFileSystem):
    """Local files behind a connection that resets on the first write of each
    path and the first move onto each destination, like a flaky object store.

    "First" is decided by creating a marker file with O_EXCL under
    $BULKGEN_FAULT_DIR/flaky/, so it holds across the driver and every replica."""

    protocol = ("flaky",)
    root_marker = "/"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)  # like an object store: any key can be written
        super().__init__(*args, **kwargs)

    def unstrip_protocol(self, name: str) -> str:
        return f"flaky://{self._strip_protocol(name)}"

    def _fail_first(self, op: str, path: str) -> None:
        d = fault_dir()
        if d is None:
            return
        path = self._strip_protocol(path)
        markers = d / "flaky"
        markers.mkdir(parents=True, exist_ok=True)
        marker = markers / hashlib.sha1(f"{op}\x00{path}".encode()).hexdigest()
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # failed once already: this time it goes through
        with os.fdopen(fd, "w") as f:
            json.dump({"op": op, "path": path, "pid": os.getpid()}, f)
        raise ConnectionResetError(f"injected: connection reset during {op} {path}")

    def _open(self, path, mode="rb", *args, **kwargs):
        if any(c in mode for c in "wax"):
            self._fail_first("write", path)
        return super()._open(path, mode, *args, **kwargs)

    def mv(self, path1, path2, *args, **kwargs):
        self._fail_first("mv", path2)
        return super().mv(path1, path2, *args, **kwargs)


def register_flaky() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def flaky_failures() -> list[dict]:
    """Every (op, path) the flaky filesystem failed, from its markers."""
    d = fault_dir()
    markers = d / "flaky" if d else None
    if markers is None or not markers.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(markers.iterdir())]


# -- patches inside the replica ----------------------------------------------------


def _wait_for_release(timeout: float = 300.0) -> None:
    """Block the shard until the test writes `release` (or, bounded, gives up)."""
    deadline = time.monotonic() + timeout
    while _config("release") is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _patch_replica() -> None:
    from workers.engine import Engine
    from workers.replica import Replica

    if getattr(Replica, "_faults_patched", False):
        return
    process = Replica.process
    prefill = Engine._prefill

    def faulty_process(self, shard, attempt, rows=None):
        _event("start", shard.index, attempt)
        hold = _config("hold")
        if hold and shard.index >= json.loads(hold)["from_shard"]:
            _wait_for_release()
        spec = _config("fail_shard")
        fail = json.loads(spec) if spec else {"index": None}
        if shard.index == fail["index"]:
            if fail["mode"] == "exit":
                os._exit(17)
            if fail["mode"] == "raise":
                raise RuntimeError(f"injected failure on shard {shard.name}")
        result = process(self, shard, attempt, rows)
        if shard.index == fail["index"]:  # "raise_after": generated and staged, then failed
            raise RuntimeError(f"injected failure on shard {shard.name}")
        _event("end", shard.index, attempt)
        return result

    def faulty_prefill(self, chunk, finished):
        # Every sequence enters the engine through a prefill: a poisoned prompt
        # breaks the forward of whatever chunk it is in, as a bad input would.
        if _config("poison") is not None:
            for request in chunk:
                if POISON in self.tokenizer.decode(list(request.prompt_ids)):
                    raise RuntimeError(f"injected: poisoned prompt in a prefill of {len(chunk)}")
        delay = _config("slow")
        if delay:
            time.sleep(float(delay) * len(chunk))
        return prefill(self, chunk, finished)

    Replica.process = faulty_process
    Engine._prefill = faulty_prefill
    Replica._faults_patched = True


def setup() -> None:
    """worker_process_setup_hook: runs once in every Ray worker process."""
    register_flaky()
    _patch_replica()


def runtime_env_hook(runtime_env: dict | None) -> dict:
    """RAY_RUNTIME_ENV_HOOK for a `bulkgen` subprocess: add the setup hook to its job."""
    runtime_env = dict(runtime_env or {})
    runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    env_vars = dict(runtime_env.get("env_vars") or {})
    if os.environ.get(FAULT_DIR_ENV):
        env_vars[FAULT_DIR_ENV] = os.environ[FAULT_DIR_ENV]
    # The setup hook is imported before Ray adds the driver's paths to the worker's.
    env_vars["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    runtime_env["env_vars"] = env_vars
    return runtime_env
