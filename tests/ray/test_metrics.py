"""bulkgen's Prometheus series, scraped from a local Ray node's metrics port during and after a tiny job.

Mid-job is made certain, not hoped for: a fault rule (jobs/core/faults.py)
holds the second half of the shards at their start until a scrape has seen
the job half done; then they are released and the job ends. Every name,
type, help text and label comes from jobs/core/metrics.py: this file spells
none of them again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core import metrics as m
from jobs.core.faults import ENV as FAULTS_ENV
from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from jobs.record import JobState
from tests.conftest import free_port, job_dict, start_local_ray, write_prompts
from tests.waiting import wait_for

# Ray labels every sample with the process that recorded it; our own labels are the rest.
RAY_LABELS = {
    "Component",
    "NodeAddress",
    "SessionName",
    "Version",
    "WorkerId",
    "otel_scope_name",
    "otel_scope_schema_url",
    "otel_scope_version",
}
SCRAPE_EVERY_S = 0.25
ROWS, ROWS_PER_SHARD, EMPTY = 100, 10, (7, 33)  # two empty prompts become dead letters (empty_prompt)
HELD_FROM = 5  # shards 5..9 wait at their start until a scrape has seen shards 0..4 committed
HOLD = "replica.shard_start"


def scrape(port: int) -> dict[str, dict]:
    """The bulkgen families on the node's /metrics: name -> {type, help, samples: {(sample, labels): value}}.
    Samples of one series from several processes (replicas) are summed."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    families: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(m.RAY_PREFIX + "bulkgen_"):
            continue
        entry = families.setdefault(
            family.name, {"type": family.type, "help": family.documentation, "samples": defaultdict(float)}
        )
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in RAY_LABELS))
            entry["samples"][(sample.name, labels)] += sample.value
    return families


def value(families: dict, series: m.Series, job: str, sample: str | None = None, **labels) -> float | None:
    """One sample's value (summed over processes); None when it was not exported."""
    want = tuple(sorted({m.JOB_NAME: job, **labels}.items()))
    for entry in families.values():
        for (name, got), v in entry["samples"].items():
            if name == (sample or series.samples[0]) and got == want:
                return v
    return None


class Scraper(threading.Thread):
    """Scrapes the node every SCRAPE_EVERY_S while the job runs in the test's thread; once
    `mid_job(snapshot)` holds (or after `timeout`, so the job still ends), calls `release`."""

    def __init__(self, port: int, mid_job, release, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.port, self.mid_job_check, self.release, self.timeout = port, mid_job, release, timeout
        self.snapshots, self.errors, self.mid_job = [], [], None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        released = False
        while not self.stop.is_set():
            try:
                snapshot = scrape(self.port)
            except OSError as e:  # the agent may not listen yet
                self.errors.append(e)
            else:
                self.snapshots.append(snapshot)
                if not released and self.mid_job_check(snapshot):
                    self.mid_job = snapshot
            if not released and (self.mid_job is not None or time.monotonic() > deadline):
                self.release()
                released = True
            self.stop.wait(SCRAPE_EVERY_S)


@pytest.fixture
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture
def metrics_port(tmp_path_factory, monkeypatch, fault_dir):
    """A local Ray whose node exports metrics on a known loopback port, every half
    second, and whose workers obey the fault rules in `fault_dir`.

    The session's shared instance has no such port: shut it down here (the next
    test that wants it starts it again) and shut this one down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Read by every Ray process as it starts (this driver's core worker and the
    # replicas' included); OpenTelemetry exports every max(this, 1 s).
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")
    port = free_port()
    start_local_ray(
        tmp_path_factory.mktemp("rm"),
        _metrics_export_port=port,
        runtime_env={"env_vars": {FAULTS_ENV: str(fault_dir)}},
    )
    try:
        yield port
    finally:
        ray.shutdown()


def _input(path) -> str:
    table = pq.read_table(write_prompts(path, ROWS))
    prompts = table.column("prompt").to_pylist()
    for i in EMPTY:
        prompts[i] = ""
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), path)
    return str(path)


def _poll(port: int, check, timeout: float = 120.0):
    """Scrape until `check(families)` returns None (all good); else fail with its last complaint."""
    problem = "never scraped"

    def scraped_and_good():
        nonlocal problem
        try:
            families = scrape(port)
        except OSError as e:
            problem = f"scrape failed: {e}"
            return None
        problem = check(families)
        return (families,) if problem is None else None  # truthy even where nothing was scraped yet

    return wait_for(scraped_and_good, timeout, lambda: f"a scrape that passes ({problem})", interval=SCRAPE_EVERY_S)[0]


@pytest.mark.ray
def test_series_move_during_a_job_and_settle_after(metrics_port, fault_dir, tiny_model, tmp_path):
    job = f"metrics-{uuid.uuid4().hex[:6]}"
    data = job_dict(
        _input(tmp_path / "in.parquet"),
        str(tmp_path / "out"),
        tiny_model,
        name=job,
        generation={"max_new_tokens": 16},
        resources={"replicas": 2, "batch_size": 4, "num_cpus": 1},
        shards={"rows_per_shard": ROWS_PER_SHARD, "max_failed_fraction": 0.1},
    )
    spec = spec_from_dict(data)
    committed_before_hold = (HELD_FROM * ROWS_PER_SHARD) - sum(i < HELD_FROM * ROWS_PER_SHARD for i in EMPTY)
    # Held until the scraper saw the job half done (or gave up): the rule's own timeout is only a backstop.
    rule = {"action": "hold", "timeout": 900, "when": {"shard": {"min": HELD_FROM}}}
    (fault_dir / f"{HOLD}.json").write_text(json.dumps(rule))
    # The node's exporter answers before the job starts (nothing of ours in it yet).
    _poll(metrics_port, lambda families: None)

    def mid_job(f) -> bool:
        """Half the job committed, the rest held: every live series shows it."""
        return (
            value(f, m.JOB_STATE, job, state=JobState.RUNNING.value) == 1
            and value(f, m.ROWS_GENERATED, job) == committed_before_hold
            and value(f, m.SHARDS_COMMITTED, job) == HELD_FROM
            and (value(f, m.SHARDS_IN_FLIGHT, job) or 0) >= 1
            and (value(f, m.SHARDS_QUEUED, job) or 0) >= 1
            and value(f, m.REPLICAS_ALIVE, job) == 2
            and (value(f, m.ENGINE_STEP_SECONDS, job, m.ENGINE_STEP_SECONDS.samples[2]) or 0) > 0
            and (value(f, m.ENGINE_BATCH_OCCUPANCY, job, m.ENGINE_BATCH_OCCUPANCY.samples[2]) or 0) > 0
        )

    scraper = Scraper(metrics_port, mid_job, release=(fault_dir / f"{HOLD}.release").touch)
    scraper.start()
    try:
        record = run_job(spec, progress=False)
    finally:
        scraper.stop.set()
        scraper.join(timeout=10)
    during = scraper.snapshots
    c = record.counts
    assert record.state == "succeeded" and c.rows_failed == len(EMPTY) and c.shards_total == 10, record.error
    assert during, f"no scrape succeeded while the job ran: {scraper.errors[-3:]}"

    # -- during the job: the series appear with the job's name, and move ------------------
    running = {m.STATE: JobState.RUNNING.value}
    last = {
        s.exported: value(during[-1], s, job, s.samples[-1], **(running if s is m.JOB_STATE else {})) for s in m.SERIES
    }
    assert scraper.mid_job is not None, f"never saw the job half done; the last scrape: {last}"
    rows = [v for f in during if (v := value(f, m.ROWS_GENERATED, job)) is not None]
    assert rows == sorted(rows), "a counter went down"

    # -- after: the counters equal the job's counts, the gauges its end state -------------
    expected = {
        m.ROWS_GENERATED: c.rows_done,
        m.ROWS_FAILED: c.rows_failed,
        m.PROMPT_TOKENS: c.prompt_tokens,
        m.COMPLETION_TOKENS: c.completion_tokens,
        m.SHARDS_PLANNED: c.shards_total,
        m.SHARDS_COMMITTED: c.shards_total,
        m.SHARDS_QUEUED: 0,
        m.SHARDS_IN_FLIGHT: 0,
        m.REPLICAS_ALIVE: 0,
    }

    def settled(families):
        got = {s.exported: value(families, s, job) for s in expected}
        want = {s.exported: float(v) for s, v in expected.items()}
        if got != want:
            return f"got {got}, want {want}"
        states = {s.value: value(families, m.JOB_STATE, job, state=s.value) for s in JobState}
        if states != {s: float(s == "succeeded") for s in states}:
            return f"job state: {states}"
        return None

    after = _poll(metrics_port, settled)

    # -- every documented series was exported, as documented ------------------------------
    everything = [*during, after]
    for series in m.SERIES:
        family = series.exported.removesuffix("_total")  # the parser names a counter's family without it
        entries = [f[family] for f in everything if family in f]
        assert entries, f"{series.exported} was never exported"
        # Ray's HELP is our help text.
        assert {e["type"] for e in entries} == {series.kind.value}, series.exported
        assert {e["help"] for e in entries} == {series.help}, series.exported
        labels = {k for e in entries for (_, got) in e["samples"] for k, _ in got if k != "le"}
        assert labels == set(series.labels), (series.exported, labels)


def test_job_name_is_the_spec_name_else_the_output_uri():
    assert m.job_name("nightly", "s3://b/out") == "nightly"
    assert m.job_name(None, "s3://b/out/") == "s3://b/out"
    assert m.job_name("  ", "/data/out") == "/data/out"
    # Credentials in a URL never become a label value.
    assert m.job_name(None, "ftp://user:secret@host/out?x=1") == "ftp://host/out"


def test_a_failing_record_is_logged_once_and_never_raised(caplog):
    from ray.util import metrics as ray_metrics

    recorder = m.Recorder(ray_metrics)
    with caplog.at_level(logging.WARNING, logger=m.__name__):
        for _ in range(3):
            recorder.set(m.JOB_STATE, 1, job_name="x")  # no `state` label: Ray raises
    warnings = [r for r in caplog.records if m.JOB_STATE.exported in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    recorder.set(m.SHARDS_QUEUED, 1, job_name="x")  # other series still record


@pytest.mark.ray
def test_a_record_costs_microseconds(ray_cluster):
    """Engine steps take milliseconds; the replica records twice a step without aggregating."""
    from ray.util import metrics as ray_metrics

    recorder = m.Recorder(ray_metrics)
    n, best = 2000, float("inf")
    for _ in range(5):  # the best of five: the machine is shared
        started = time.perf_counter()
        for _ in range(n):
            recorder.observe(m.ENGINE_STEP_SECONDS, 0.02, job_name="cost")
        best = min(best, (time.perf_counter() - started) / n)
    assert best < 50e-6, f"{best * 1e6:.1f} us a record"


def test_the_state_series_help_names_every_state():
    # jobs.core cannot import jobs.record, so the help spells the states: keep it true.
    assert all(state.value in m.JOB_STATE.help for state in JobState)
