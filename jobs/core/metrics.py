"""The Prometheus series bulkgen exports, defined once for the driver, the replicas and the dashboard.

They are recorded through Ray's metrics API (ray.util.metrics), which every
Ray node exports on its metrics port for Prometheus to scrape. Ray adds a
`ray_` prefix to every name and `_total` to counters' names, and labels every
sample with the recording process (WorkerId, NodeAddress, SessionName, ...):
`exported` below spells what a PromQL query sees, and cluster/grafana/bulkgen.json
queries exactly those names (tests/cluster/test_grafana.py keeps the two equal).

Labels: every series carries `job_name` (never `job`: that is the scrape
target's label in Prometheus, and a sample's own `job` would be renamed
`exported_job`). There is no replica label: Ray's WorkerId already tells
processes apart, and one value per replica ever started would grow without end.

Who records what:
- the driver (jobs/driver_metrics.py): rows, tokens, shards, replicas alive, job
  state. Rows and tokens are counted as shards commit, from the job's counts,
  so a retried attempt is never counted twice.
- each replica (workers/engine_loop.py): engine step time and batch occupancy.

jobs.core imports no Ray: the side that records passes ray.util.metrics in
(`Recorder(backend)`), and a failed record is logged once and never raised,
because metrics must never fail a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

JOB_NAME = "job_name"  # the label every series carries
STATE = "state"  # bulkgen_job_state's label: one of jobs.record.JobState's values
RAY_PREFIX = "ray_"  # Ray prefixes every application metric's name with it


class Kind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Series:
    name: str  # as Ray is given it: no `ray_` prefix, and no `_total` for a counter (Ray appends it)
    kind: Kind
    help: str
    labels: tuple[str, ...] = (JOB_NAME,)
    boundaries: tuple[float, ...] = ()  # a histogram's bucket upper bounds (+Inf is implied)

    @property
    def exported(self) -> str:
        """The name a PromQL query uses (a histogram's base name, before _bucket/_sum/_count)."""
        return RAY_PREFIX + self.name + ("_total" if self.kind is Kind.COUNTER else "")

    @property
    def samples(self) -> tuple[str, ...]:
        """The sample names the series is scraped as."""
        if self.kind is Kind.HISTOGRAM:
            return tuple(f"{self.exported}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.exported,)


# -- recorded by the driver ---------------------------------------------------------------

ROWS_GENERATED = Series(
    "bulkgen_rows_generated", Kind.COUNTER, "Output rows (one per id and sample_index) committed to the data files."
)
ROWS_FAILED = Series("bulkgen_rows_failed", Kind.COUNTER, "Output rows committed as dead letters to the errors files.")
PROMPT_TOKENS = Series(
    "bulkgen_prompt_tokens",
    Kind.COUNTER,
    "Prompt tokens of the committed output rows (a prompt counts once for each of its samples).",
)
COMPLETION_TOKENS = Series("bulkgen_completion_tokens", Kind.COUNTER, "Tokens generated for the committed output rows.")
SHARDS_PLANNED = Series("bulkgen_shards_planned", Kind.GAUGE, "Shards in the job's plan.")
SHARDS_QUEUED = Series("bulkgen_shards_queued", Kind.GAUGE, "Shards waiting for a replica in this run.")
SHARDS_IN_FLIGHT = Series("bulkgen_shards_in_flight", Kind.GAUGE, "Shards a replica is generating now.")
SHARDS_COMMITTED = Series(
    "bulkgen_shards_committed", Kind.GAUGE, "Shards of the job committed so far, earlier runs included."
)
REPLICAS_ALIVE = Series("bulkgen_replicas_alive", Kind.GAUGE, "Replicas whose model has loaded and that have not died.")
JOB_STATE = Series(
    "bulkgen_job_state",
    Kind.GAUGE,
    "1 for the job's current state, 0 for the others (pending, validating, running, finalizing, succeeded, "
    "failed, cancelled).",
    labels=(JOB_NAME, STATE),
)

# -- recorded by each replica -------------------------------------------------------------

ENGINE_STEP_SECONDS = Series(
    "bulkgen_engine_step_seconds",
    Kind.HISTOGRAM,
    "Wall time of one engine step (admit, prefill and decode one token for every running sequence).",
    # Decode steps take ~5 ms on a GPU to ~50 ms on a CPU; a step with a large prefill, seconds.
    boundaries=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ENGINE_BATCH_OCCUPANCY = Series(
    "bulkgen_engine_batch_occupancy_ratio",
    Kind.HISTOGRAM,
    "Per engine step: sequences the engine held (running or waiting for a slot), up to its batch size, "
    "over resources.batch_size. Below 1 the batch ran part empty for want of work.",
    boundaries=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0),
)

DRIVER_SERIES = (
    ROWS_GENERATED,
    ROWS_FAILED,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    SHARDS_PLANNED,
    SHARDS_QUEUED,
    SHARDS_IN_FLIGHT,
    SHARDS_COMMITTED,
    REPLICAS_ALIVE,
    JOB_STATE,
)
REPLICA_SERIES = (ENGINE_STEP_SECONDS, ENGINE_BATCH_OCCUPANCY)
SERIES = DRIVER_SERIES + REPLICA_SERIES


def job_name(name: str | None, output_uri: str) -> str:
    """The `job_name` label of a job: its spec's name, else its output URI (which
    identifies a job: `bulkgen status` takes it) without credentials, query or fragment."""
    if name and name.strip():
        return name.strip()
    parts = urlsplit(output_uri)
    netloc = parts.netloc.rpartition("@")[2]  # s3://KEY:SECRET@bucket/... must not become a label
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/") or output_uri


def markdown_table() -> str:
    """The series as the README's operator section lists them."""
    lines = ["| series | type | labels | meaning |", "|---|---|---|---|"]
    for s in SERIES:
        lines.append(
            f"| `{s.exported}` | {s.kind.value} | {', '.join(f'`{label}`' for label in s.labels)} | {s.help} |"
        )
    return "\n".join(lines)


class Recorder:
    """Records series on a metrics backend, and never fails its caller.

    `backend` is ray.util.metrics (or anything with its Counter, Gauge and
    Histogram). Each series' metric object is made on first use. Ray's
    metrics are process-wide: objects of one name share their values, work
    before ray.init (records are dropped) and after a ray.shutdown and re-init.
    A record costs ~1.5 us in Ray 2.60 (measured: 1.3 us a Counter.inc, 1.6 us
    a Histogram.observe, in a driver and in an actor), so callers record every
    event and aggregate nothing themselves."""

    def __init__(self, backend):
        self._backend = backend
        self._metrics: dict[str, object] = {}
        self._broken: set[str] = set()  # series whose failure was logged already

    def inc(self, series: Series, value: float, **labels: str) -> None:
        if value > 0:  # Ray refuses 0 and below; a counter that does not move records nothing
            self._record(series, "inc", value, labels)

    def set(self, series: Series, value: float, **labels: str) -> None:
        self._record(series, "set", value, labels)

    def observe(self, series: Series, value: float, **labels: str) -> None:
        self._record(series, "observe", value, labels)

    def _record(self, series: Series, method: str, value: float, labels: dict[str, str]) -> None:
        try:
            metric = self._metrics.get(series.name) or self._make(series)
            getattr(metric, method)(value, tags=labels)
        except Exception:  # metrics must never fail a job: say so once per series, then go on
            if series.name not in self._broken:
                self._broken.add(series.name)
                log.warning("cannot record metric %s; not reporting this again", series.exported, exc_info=True)

    def _make(self, series: Series):
        b = self._backend
        if series.kind is Kind.COUNTER:
            metric = b.Counter(series.name, description=series.help, tag_keys=series.labels)
        elif series.kind is Kind.GAUGE:
            metric = b.Gauge(series.name, description=series.help, tag_keys=series.labels)
        else:
            metric = b.Histogram(
                series.name, description=series.help, boundaries=list(series.boundaries), tag_keys=series.labels
            )
        self._metrics[series.name] = metric
        return metric


if __name__ == "__main__":
    print(markdown_table())  # the table in the README's "Operating jobs" section
