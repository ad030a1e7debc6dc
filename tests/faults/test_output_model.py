"""A randomized model-based test of the exactly-once promise (hypothesis's state machines).

Hypothesis interleaves, on one output that a first run planned: `bulkgen run` and `bulkgen
resume`, runs whose driver is killed at a random fault point (os._exit, as a crash would),
input files added, removed and rewritten, `--overwrite`, and two drivers started at once. The model knows
only what a user knows: the input now, and the input the output was planned on. After
every step the output is either exactly once for the input it claims (a run that exits 0
generated every row of today's input once), or the command was refused with exit 2 and
the output is as it was; whatever happened, no row is ever written twice and every file
reads whole.

The drivers are real `bulkgen` processes joining one local Ray cluster (started once: a
cluster per run would cost seconds each). It runs on local files, and a few examples
against the loopback S3 server.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cluster.local_cluster import LocalCluster
from jobs.core.faults import ENV as FAULTS_ENV
from tests.conftest import job_dict
from tests.faults.conftest import Faults, bulkgen_command, cli_env

pytestmark = [pytest.mark.ray, pytest.mark.faults]

KILLED = 17  # the exit code of the fault rule's os._exit
RUN_TIMEOUT_S = 300  # a generous bound for a 40-row job on a loaded 2-core machine
# Where a driver can be killed, and whether the run had pinned its input by then.
KILL_POINTS = {
    "before validation": ("driver.validate", {}, False),
    "publishing a data file": ("storage.move", {"path": {"contains": "/data/part-00001"}}, True),
    "writing a commit record": ("storage.write", {"path": {"contains": "_commits/part-00000"}}, True),
    "writing _SUCCESS": ("storage.write", {"path": {"contains": "_SUCCESS"}}, True),
}
FILE_NAMES = ("a.parquet", "b.parquet", "c.parquet")


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("om"), num_cpus=2, dashboard=False) as cluster:
        yield cluster


class Store:
    """Where one example's input and output live: a local directory or an S3 bucket.

    Every read of the output drops fsspec's listing cache first: the drivers change the output
    from other processes, and s3fs answers from listings it cached before they ran (a file's old
    ETag, a _SUCCESS already deleted or not yet written)."""

    def __init__(self, root: str, storage_options: dict):
        self.root, self.options = root.rstrip("/"), storage_options
        self.fs, _ = fsspec.core.url_to_fs(self.root, **storage_options)

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def write_prompts(self, name: str, first_id: int, n: int) -> None:
        table = pa.table({
            "id": [f"row-{i:05d}" for i in range(first_id, first_id + n)],
            "prompt": [f"Write note {i} about the sea" for i in range(first_id, first_id + n)],
            "topic": ["the sea"] * n,
        })  # fmt: skip
        self.fs.makedirs(self.url("in"), exist_ok=True)
        with self.fs.open(self.url("in", name), "wb") as f:
            pq.write_table(table, f)

    def remove(self, name: str) -> None:
        self.fs.rm(self.url("in", name))

    def files(self) -> dict[str, str]:
        """Every file under the output that a job's result consists of, by content hash (not
        the logs and claims, which every run, refused or not, may add to)."""
        root = self.url("out")
        self.fs.invalidate_cache()
        found = {}
        for path in self.fs.find(root):
            rel = posixpath.relpath(path, self.fs._strip_protocol(root))
            if rel.split("/")[0] not in ("_logs", "_claims"):
                found[rel] = hashlib.sha256(self.fs.cat_file(path)).hexdigest()
        return found

    def record(self) -> dict | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(self.url("out", "_job.json")))
        except FileNotFoundError:
            return None

    def succeeded(self) -> bool:
        """Whether out/_SUCCESS exists now."""
        self.fs.invalidate_cache()
        return self.fs.exists(self.url("out", "_SUCCESS"))

    def rows(self) -> Counter:
        """(id, sample_index) -> how many times data/, errors/ and filtered/ hold it; every file
        must read whole."""
        self.fs.invalidate_cache()
        keys: Counter = Counter()
        for top in ("data", "errors", "filtered"):
            for path in self.fs.glob(self.url("out", top, "*")):
                with self.fs.open(path, "rb") as f:
                    table = pq.read_table(f, columns=["id", "sample_index"])
                keys.update(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
        return keys


class OutputModel(RuleBasedStateMachine):
    """One output, one spec; the rules are what a nightly user and an operator do to it."""

    store: Store  # set by the test before each example
    cluster: LocalCluster
    model: Path
    workdir: Path

    def __init__(self):
        super().__init__()
        self.example = self.workdir / f"ex{len(list(self.workdir.iterdir()))}"
        self.example.mkdir()
        self.store = Store(self.store.url(self.example.name), self.store.options)
        self.faults = Faults(self.example / "faults")
        self.input: dict[str, range] = {}  # file name -> the ids it holds now
        self.next_id = 0
        self.pinned: dict[str, range] | None = None  # the input the output was planned on
        self.resumable = False  # the output has a job record to resume from

    # -- the input ------------------------------------------------------------------

    def _write(self, name: str, n: int) -> None:
        self.store.write_prompts(name, self.next_id, n)
        self.input[name] = range(self.next_id, self.next_id + n)
        self.next_id += n

    @initialize(n=st.integers(1, 30))
    def first_input(self, n):
        self._write("b.parquet", n)
        spec = job_dict(self.store.url("in"), self.store.url("out"), self.model,
                        generation={"max_new_tokens": 2}, shards={"rows_per_shard": "auto"})  # fmt: skip
        spec["input"].update(storage_options=self.store.options)
        spec["output"].update(storage_options=self.store.options)
        (self.example / "job.yaml").write_text(yaml.safe_dump(spec))
        self._run_once("run", overwrite=False, kill=None)  # every example starts from a planned output

    @rule(name=st.sampled_from(FILE_NAMES), n=st.integers(1, 30))
    def add_or_rewrite_file(self, name, n):
        self._write(name, n)

    @precondition(lambda self: len(self.input) > 1)
    @rule(data=st.data())
    def remove_file(self, data):
        name = data.draw(st.sampled_from(sorted(self.input)))
        self.store.remove(name)
        del self.input[name]

    # -- drivers --------------------------------------------------------------------

    def _start(self, args: list[str], kill: str | None = None) -> subprocess.Popen:
        env = self.cluster.driver_env(cli_env())
        if kill is not None:
            point, when, _ = KILL_POINTS[kill]
            self.faults.clear()
            self.faults.rule(point, action="exit", code=KILLED, when=when)
            env[FAULTS_ENV] = str(self.faults.dir)
        log = (self.example / f"driver-{len(list(self.example.glob('driver-*')))}.log").open("w")
        return subprocess.Popen(bulkgen_command(*args, "--no-progress"), env=env, stdout=log, stderr=subprocess.STDOUT)

    def _command(self, how: str, overwrite: bool) -> list[str]:
        if how == "resume":
            return ["resume", self.store.url("out")]
        return ["run", str(self.example / "job.yaml"), *(["--overwrite"] if overwrite else [])]

    def _wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"a driver did not end within {RUN_TIMEOUT_S}s: {proc.args}") from None

    def _expect_success(self, overwrite: bool) -> bool:
        """Whether a run now must generate today's input (else it must refuse with exit 2)."""
        return self.pinned is None or self.pinned == self.input or overwrite

    @rule(how=st.sampled_from(["run", "resume"]), overwrite=st.booleans(),
          kill=st.none() | st.sampled_from(sorted(KILL_POINTS)), drivers=st.sampled_from([1, 1, 2]))  # fmt: skip
    def run(self, how, overwrite, kill, drivers):
        if drivers == 2:
            self._two_drivers_at_once()
        else:
            self._run_once(how, overwrite, kill)

    def _run_once(self, how: str, overwrite: bool, kill: str | None) -> None:
        if how == "resume" and (not self.resumable or self.store.options):  # resume's record has no credentials
            how = "run"
        overwrite = overwrite and how == "run"
        before, expect_success = self.store.files(), self._expect_success(overwrite)
        code = self._wait(self._start(self._command(how, overwrite), kill))
        self.faults.clear()
        if code == KILLED:
            assert expect_success, "a run that had to be refused got as far as the kill point"
            pinned_by_then = KILL_POINTS[kill][2]
            if pinned_by_then:
                self.pinned = dict(self.input)
            elif self.pinned != self.input:  # a fresh output, or --overwrite wiped the old one
                self.pinned = None
            self.resumable = True
            return
        self._check_outcome(code, before, expect_success)

    def _two_drivers_at_once(self):
        before, expect_success = self.store.files(), self._expect_success(False)
        procs = [self._start(self._command("run", False)) for _ in range(2)]
        codes = sorted(self._wait(p) for p in procs)
        if expect_success:
            # One runs; the other is refused, unless it started after the first had finished.
            assert codes in ([0, 0], [0, 2]), f"exit codes {codes}: {self._logs()}"
            self._check_outcome(0, before, True)
        else:
            assert codes == [2, 2], f"exit codes {codes}: {self._logs()}"
            self._check_outcome(2, before, False)

    def _check_outcome(self, code: int, before: dict, expect_success: bool) -> None:
        if expect_success:
            assert code == 0, f"exit {code}, expected success: {self._logs()}"
            expected = {(f"row-{i:05d}", 0) for ids in self.input.values() for i in ids}
            rows = self.store.rows()
            assert set(rows) == expected, (
                f"missing {sorted(expected - set(rows))[:5]}, unexpected {sorted(set(rows) - expected)[:5]}"
            )
            record = self.store.record()
            assert record["state"] == "succeeded" and self.store.succeeded()
            assert record["counts"]["rows_total"] == len(expected)
            self.pinned, self.resumable = dict(self.input), True
        else:
            assert code == 2, f"exit {code}, expected a refusal (exit 2): {self._logs()}"
            assert self.store.files() == before, "a refused run changed the output"

    def _logs(self) -> str:
        newest = sorted(self.example.glob("driver-*.log"), key=os.path.getmtime)[-2:]
        return "\n".join(p.read_text()[-2500:] for p in newest)

    # -- after every step ------------------------------------------------------------

    @invariant()
    def never_a_row_twice_nor_a_half_file(self):
        rows = self.store.rows()  # reads every file whole
        twice = {k: n for k, n in rows.items() if n > 1}
        assert not twice, f"rows written more than once: {sorted(twice)[:5]}"
        if self.store.succeeded():
            assert (self.store.record() or {}).get("state") == "succeeded"


def _run_machine(tmp_path: Path, cluster: LocalCluster, model: Path, store_root: str, options: dict, examples: int):
    OutputModel.store, OutputModel.cluster, OutputModel.model = Store(store_root, options), cluster, model
    OutputModel.workdir = tmp_path
    case = OutputModel.TestCase
    case.settings = settings(
        # A soak run asks for more: OUTPUT_MODEL_EXAMPLES=50 python -m pytest tests/faults/test_output_model.py
        max_examples=int(os.environ.get("OUTPUT_MODEL_EXAMPLES", examples)),
        stateful_step_count=6,
        deadline=None,
        derandomize=os.environ.get("CI") is not None,  # CI: the same examples every run; locally, new ones
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    case().runTest()


def test_exactly_once_or_refused_on_local_files(shared_cluster, tiny_model, tmp_path):
    _run_machine(tmp_path, shared_cluster, tiny_model, str(tmp_path / "store"), {}, examples=5)


@pytest.mark.s3
def test_exactly_once_or_refused_on_s3(shared_cluster, tiny_model, tmp_path, s3):
    # Credentials in the options: the drivers and the cluster's replicas do not share this test's environment.
    options = {"key": "testing", "secret": "testing", **s3["options"]}
    _run_machine(tmp_path, shared_cluster, tiny_model, f"s3://{s3['bucket']}", options, examples=2)
