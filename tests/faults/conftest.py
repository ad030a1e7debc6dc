"""Fault-test helpers: a Ray instance whose workers see a fault directory, fault rules
written there (jobs/core/faults.py), process control, and the exactly-once checker
every fault test ends with."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest

from jobs.core.faults import ENV as FAULTS_ENV
from tests.conftest import REPO, start_local_ray

PART = re.compile(r"part-\d{5}\.parquet")


# -- the output, as a reader sees it -----------------------------------------------


@dataclass
class Checked:
    files: list[str]  # every file under the output, relative to its root
    data: list[dict]
    errors: list[dict]
    record: dict | None
    commits: dict[int, dict]  # shard index -> _commits/part-NNNNN.json
    success: bool


def commit_records(uri: str, storage_options: dict | None = None) -> dict[int, dict]:
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    try:
        paths = [p for p in fs.ls(posixpath.join(root, "_commits"), detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    records = {}
    for p in paths:
        try:
            doc = json.loads(fs.cat_file(p))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # being replaced right now; the next poll sees it
        records[doc["shard"]] = doc
    return records


def read_record(uri: str, storage_options: dict | None = None) -> dict | None:
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        return json.loads(fs.cat_file(posixpath.join(root, "_job.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_output(
    uri: str,
    expected_ids,
    n: int = 1,
    storage_options: dict | None = None,
    id_column: str = "id",
) -> Checked:
    """The exactly-once check: every (id, sample_index) of the input appears exactly once
    across data/, errors/ and filtered/, nothing but part-NNNNN.parquet lives there, every file
    reads whole, and _SUCCESS is there iff the record says succeeded."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    fs.invalidate_cache()
    files = sorted(posixpath.relpath(p, root) for p in fs.find(root))
    rows: dict[str, list[dict]] = {"data": [], "errors": [], "filtered": []}
    for rel in files:
        top, _, name = rel.partition("/")
        if top not in rows:
            continue
        assert PART.fullmatch(name), f"unexpected file {rel!r} in {top}/ of {uri}"
        with fs.open(posixpath.join(root, rel), "rb") as f:
            table = pq.read_table(f)  # the whole file, or it raises
        rows[top].extend(table.to_pylist())
    keys = Counter((r[id_column], r["sample_index"]) for r in rows["data"] + rows["errors"] + rows["filtered"])
    duplicated = {k: c for k, c in keys.items() if c > 1}
    assert not duplicated, f"rows written more than once: {sorted(duplicated.items())[:10]}"
    expected = {(i, s) for i in expected_ids for s in range(n)}
    missing, extra = expected - set(keys), set(keys) - expected
    assert not missing, f"{len(missing)} (id, sample_index) missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected (id, sample_index), e.g. {sorted(extra)[:5]}"
    record = read_record(uri, storage_options)
    success = "_SUCCESS" in files
    state = record and record["state"]
    assert success == (state == "succeeded"), f"_SUCCESS {'present' if success else 'absent'}, state {state}"
    return Checked(files, rows["data"], rows["errors"], record, commit_records(uri, storage_options), success)


# -- fault control -----------------------------------------------------------------


class Faults:
    """Fault rules for the product's fault points (jobs/core/faults.py), written as files
    DIR/POINT.json into the fault directory that every process of the job is given in
    BULKGEN_FAULTS; and what the points traced there (DIR/trace.jsonl)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def rule(self, point: str, **rule) -> None:
        """Set the rule for `point`: written whole under another name, then renamed, so a
        process never reads half of it."""
        tmp = self.dir / f".{point}.json.tmp"
        tmp.write_text(json.dumps(rule))
        tmp.replace(self.dir / f"{point}.json")

    def slow(self, seconds_per_sequence: float) -> None:
        """Every prefill sleeps this long per sequence, so shards take long enough to be killed mid-way."""
        self.rule("engine.prefill", action="sleep", seconds=seconds_per_sequence, per="sequences")

    def poison(self) -> None:
        """A prefill holding a prompt that contains "POISON" raises, as a bad input would break a forward."""
        self.rule("engine.prefill", action="raise", when={"prompts": {"contains": "POISON"}})

    def fail_shard(self, index: int, mode: str = "raise") -> None:
        """On shard `index` the replica raises at once ("raise"), dies ("exit"), or raises
        after generating and staging it ("raise_after")."""
        if mode == "raise_after":
            self.rule("replica.shard_end", action="raise", when={"shard": index})
        elif mode in ("raise", "exit"):
            self.rule("replica.shard_start", action=mode, when={"shard": index})
        else:
            raise ValueError(f"unknown fail_shard mode {mode!r}")

    def hold(self, from_shard: int) -> None:
        """Shards from `from_shard` on wait in the replica until release(): the job stays
        partly done for as long as the test needs."""
        self.rule("replica.shard_start", action="hold", when={"shard": {"min": from_shard}})

    def release(self) -> None:
        (self.dir / "replica.shard_start.release").touch()

    def flaky_storage(self) -> None:
        """Like a flaky object store: the first write of each path, and the first move onto
        each destination, resets the connection (once across all processes)."""
        self.rule("storage.write", action="fail_once", key="path")
        self.rule("storage.move", action="fail_once", key="path")

    def flaky_failures(self) -> list[dict]:
        """{"point", "key", "pid"} of every storage operation that failed once."""
        markers = self.dir / "failed_once"
        if not markers.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(markers.iterdir())]

    def clear(self) -> None:
        for path in self.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def trace(self) -> list[dict]:
        """Every fault point passed so far, in the order they were written."""
        try:
            lines = (self.dir / "trace.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # being appended right now; the next poll sees it whole
        return out

    def reached(self, point: str, path_contains: str = "") -> bool:
        """Whether any process has passed `point` (one whose path contains `path_contains`)."""
        return any(e["point"] == point and path_contains in e.get("path", "") for e in self.trace())

    def events(self) -> list[tuple[str, int, str, int]]:
        """(kind, shard, attempt, pid) of every shard start/end the replicas passed."""
        kinds = {"replica.shard_start": "start", "replica.shard_end": "end"}
        return [(kinds[e["point"]], e["shard"], e["attempt"], e["pid"]) for e in self.trace() if e["point"] in kinds]

    def running(self) -> list[tuple[int, str, int]]:
        """(shard, attempt, pid) of shards a replica started and has not finished."""
        events = self.events()
        ended = {(s, a) for k, s, a, _ in events if k == "end"}
        return [(s, a, p) for k, s, a, p in events if k == "start" and (s, a) not in ended]


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture
def faults(fault_dir):
    """The in-process fault Ray's switches, all off before and after the test."""
    control = Faults(fault_dir)
    control.clear()
    yield control
    control.clear()


_OURS: dict = {"ray": False}


@pytest.fixture(scope="package")
def _fault_ray_owner():
    yield _OURS
    import ray

    if _OURS["ray"] and ray.is_initialized():
        ray.shutdown()
    _OURS["ray"] = False


@pytest.fixture
def fault_ray(_fault_ray_owner, fault_dir, tmp_path_factory):
    """A local Ray (2 CPUs, loopback) whose workers are given the fault directory; started
    once and shared by the fault tests. Any other Ray this process runs is shut down first."""
    import ray

    # Ours only while it still gives its workers the fault directory: a test between two fault
    # tests may have shut ours down and started a plain one (a driver run in-process does).
    ours = _OURS["ray"] and ray.is_initialized() and _fault_env(ray) == str(fault_dir)
    if ray.is_initialized() and not ours:
        ray.shutdown()
    if not ray.is_initialized():
        start_local_ray(
            tmp_path_factory.mktemp("fr"),
            runtime_env={"env_vars": {FAULTS_ENV: str(fault_dir)}},
        )
        _OURS["ray"] = True
    return ray


def _fault_env(ray) -> str | None:
    return ray.get_runtime_context().runtime_env.get("env_vars", {}).get(FAULTS_ENV)


# -- a job in a background thread --------------------------------------------------


class JobThread:
    """run_job in a thread of the test process (which holds the Ray connection)."""

    def __init__(self, spec, **kwargs):
        from jobs.driver import run_job

        self.spec = spec
        self.record = None
        self.error: BaseException | None = None

        def target():
            try:
                self.record = run_job(spec, progress=False, **kwargs)
            except BaseException as e:  # handed to the test through join()
                self.error = e

        self.thread = threading.Thread(target=target, name="bulkgen-driver", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the job did not end within {timeout:.0f}s"
        return self.record, self.error

    def stop(self) -> None:
        """Teardown for a failed test: cancel the job so its thread ends."""
        if self.thread.is_alive():
            from jobs.driver import request_cancel

            try:
                request_cancel(self.spec.output.uri)
            except (OSError, ValueError):
                pass
            self.thread.join(60)


@pytest.fixture
def job_threads():
    started: list[JobThread] = []

    def start(spec, **kwargs) -> JobThread:
        job = JobThread(spec, **kwargs)
        started.append(job)
        return job

    yield start
    for job in started:
        job.stop()


# -- `bulkgen` subprocesses --------------------------------------------------------


def bulkgen_command(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("bulkgen")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "jobs.cli", *args]


def cli_env(ray_tmpdir: Path | None = None, fault_dir: Path | None = None) -> dict:
    """Environment for a `bulkgen` subprocess: its own local Ray under `ray_tmpdir`, and
    with `fault_dir` the fault rules there, for the driver and (the local Ray it starts
    inherits its environment) its Ray workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != FAULTS_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    if ray_tmpdir is not None:
        env["RAY_TMPDIR"] = str(ray_tmpdir)
    if fault_dir is not None:
        env[FAULTS_ENV] = str(fault_dir)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        bulkgen_command(*args), env=env or cli_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


class Bulkgen:
    """A running `bulkgen` subprocess; its output goes to files (a pipe could fill and block it)."""

    def __init__(self, command: list[str], env: dict, logdir: Path):
        self.log = logdir / f"bulkgen-{time.monotonic_ns()}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT, preexec_fn=_as_in_a_terminal
        )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bulkgen did not exit within {timeout:.0f}s:\n{self.output()[-3000:]}") from None

    def tree(self) -> list[psutil.Process]:
        try:
            me = psutil.Process(self.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _as_in_a_terminal() -> None:
    """In the child, before it runs bulkgen: Ctrl-C does what it does for a command started
    in a terminal. A test run started in the background of a non-interactive shell (`pytest &`,
    a CI harness) has SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the driver would never see the Ctrl-C a test sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ray_processes(ray_tmpdir: Path) -> list[psutil.Process]:
    """Processes of the Ray instance living under `ray_tmpdir`: its command line names the
    directory, or (Ray workers rename themselves) their environment does."""
    marker = str(ray_tmpdir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if any(marker in part for part in p.info["cmdline"] or ()):
                found.append(p)
            elif p.environ().get("RAY_TMPDIR") == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_left_behind(tree: list[psutil.Process], ray_tmpdir: Path) -> None:
    """Kill, by pid, what a driver that is gone left running: its children (`tree` is its process
    tree, itself first) and every process of the Ray living under `ray_tmpdir`."""
    left = {p.pid: p for p in [*tree[1:], *ray_processes(ray_tmpdir)]}  # a child of the driver is often both
    kill_processes(list(left.values()))


def kill_processes(procs: list[psutil.Process], timeout: float = 20) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


@pytest.fixture
def bulkgen_procs(tmp_path):
    """Start `bulkgen` subprocesses; whatever they (and the Ray they started) left running
    is killed at teardown, by pid."""
    started: list[tuple[Bulkgen, Path | None]] = []

    def start(args: list[str], env: dict, command: list[str] | None = None) -> Bulkgen:
        """`bulkgen ARGS...`, or `command` when given."""
        proc = Bulkgen(command or bulkgen_command(*args), env, tmp_path)
        started.append((proc, Path(env["RAY_TMPDIR"]) if "RAY_TMPDIR" in env else None))
        return proc

    yield start
    for proc, ray_tmpdir in started:
        leftovers = proc.tree()
        if ray_tmpdir is not None:
            leftovers += ray_processes(ray_tmpdir)
        kill_processes(leftovers)
        proc._log_file.close()


@pytest.fixture
def ray_tmpdirs(tmp_path_factory):
    """Make short directories for subprocesses' RAY_TMPDIR (Unix socket paths must stay
    short); any process of a Ray living under one is killed at teardown."""
    made: list[Path] = []

    def make() -> Path:
        made.append(tmp_path_factory.mktemp("rt"))
        return made[-1]

    yield make
    for d in made:
        kill_processes(ray_processes(d))
