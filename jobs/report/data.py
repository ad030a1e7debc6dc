"""What the report reads from a job's output: the record, the commit records, and
the data/, errors/ and filtered/ Parquet files of the committed shards.

Files are streamed one at a time, and only the columns asked for are read.
Cheap columns are read in full, so their numbers are exact: token counts
(kept as histograms, whose size is the longest length, not the row count),
finish reasons, error codes, filter names and evaluation scores. Texts are
not: repeats and diversity look at a sample of at most `sample_rows` texts,
read from row groups picked at random, so a report on a million rows reads a
few thousand texts. The columns optional features add (logprobs, adapters,
structured output, reasoning) are counted in full where present
(jobs/report/features.py). Only committed shards count, so a running job's
report is true of what it has finished so far.

Over 300 lines because all reading of an output for the report is here, so the
rendering modules never touch storage.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.core.layout import FILTERED, RECORD, OutputLayout
from jobs.core.protocol import CommitRecord
from jobs.core.rows import EVALUATION_FIELDS, FILTER
from jobs.core.storage import open_parquet, with_retries
from jobs.output import OutputDir
from jobs.record import JobState, committed_counts, driver_alive
from jobs.record_file import read_record_doc
from jobs.report import features
from jobs.report.features import Features, add_histograms

log = logging.getLogger(__name__)

# What a truncated or corrupt Parquet file raises (pyarrow's ArrowInvalid is a ValueError, its
# IO errors OSErrors): the report names the file instead of failing.
UNREADABLE = (pa.ArrowException, OSError, ValueError)

SAMPLE_ROWS = 2_000  # texts read for repeats and diversity
EXAMPLES = 3  # example rows shown per error code and per filter
# Per-row scores an evaluation writes into data/; the report shows those present.
EVALUATION_COLUMNS = tuple(f.name for f in EVALUATION_FIELDS)
FILTER_COLUMN = FILTER.name  # in filtered/: the name of the filter that dropped the row
CORPUS_ROWS = 200_000  # rows the corpus scores are computed over, at most
READERS = 8  # files read at once: object stores answer slowly but in parallel


@dataclass
class Scores:
    """Sums and counts of evaluation scores, merged file by file into means."""

    total: Counter = field(default_factory=Counter)  # metric -> sum
    count: Counter = field(default_factory=Counter)  # metric -> rows with a score
    by_sample: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))  # sample_index -> sums
    by_sample_count: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    best_total: Counter = field(default_factory=Counter)  # per id, the best of its samples
    best_count: Counter = field(default_factory=Counter)

    def merge(self, other: Scores) -> None:
        self.total += other.total
        self.count += other.count
        self.best_total += other.best_total
        self.best_count += other.best_count
        for i, sums in other.by_sample.items():
            self.by_sample[i] += sums
            self.by_sample_count[i] += other.by_sample_count[i]

    @property
    def metrics(self) -> list[str]:
        return [m for m in EVALUATION_COLUMNS if self.count[m]]


@dataclass
class Dropped:
    """Rows of errors/ (by error code) or filtered/ (by filter): counts and a few examples each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    structured: Counter = field(default_factory=Counter)  # filtered/: rows by the constraint kind they satisfied

    def merge(self, other: Dropped) -> None:
        self.counts += other.counts
        self.structured += other.structured
        for key, rows in other.examples.items():
            self.examples[key].extend(rows[: EXAMPLES - len(self.examples[key])])


@dataclass
class DataFile:
    """One data/ file, read for its cheap columns."""

    url: str
    rows: int = 0
    row_groups: list[int] = field(default_factory=list)  # rows in each
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # histogram: length -> rows
    completion_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    finish_reasons: Counter = field(default_factory=Counter)
    max_sample_index: int = 0
    scores: Scores = field(default_factory=Scores)
    features: Features = field(default_factory=Features)


@dataclass
class OutputData:
    """Everything the report shows, read from one output."""

    uri: str
    record: dict  # _job.json as written, fields newer than this code included
    driver_alive: bool  # for a record that says running: whether its driver still runs
    commits: list[CommitRecord]  # by shard
    rows: int = 0  # rows read from data/
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    completion_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    finish_reasons: Counter = field(default_factory=Counter)
    max_sample_index: int = 0
    scores: Scores = field(default_factory=Scores)
    features: Features = field(default_factory=Features)  # logprobs, adapters, structured output, reasoning
    errors: Dropped = field(default_factory=Dropped)
    filtered: Dropped = field(default_factory=Dropped)
    sample: list[str] = field(default_factory=list)  # texts for repeats and diversity
    missing_files: list[str] = field(default_factory=list)  # committed, gone when read (a retry rewrote it)
    unreadable_files: list[str] = field(default_factory=list)  # "URL: why": committed, not readable (truncated?)
    corpus: dict[str, float] = field(default_factory=dict)  # evaluation: corpus BLEU and chrF (sacreBLEU)
    corpus_rows: int = 0  # the rows they are over

    @property
    def state(self) -> JobState:
        return JobState(self.record.get("state", "pending"))


def read_output(uri: str, storage_options: dict, sample_rows: int = SAMPLE_ROWS, seed: int = 0) -> OutputData:
    """Read an output for its report; raises FileNotFoundError when it has no job record,
    OutputError when the URI is a file or its record is no job record."""
    out = OutputDir(uri, storage_options)
    record = read_record_doc(out)
    if record is None:
        raise FileNotFoundError(f"no job record ({RECORD}) under {out.uri}: not a bulkgen output")
    commits = [record for _, record in sorted(out.commit_records().items())]
    # Counted from the commit records read here, not the record's copy (saved at most
    # every second after a commit): the report's numbers agree with the shards it shows.
    record["counts"] = {**record.get("counts", {}), **committed_counts(commits)}
    alive = record.get("state") == JobState.RUNNING.value and driver_alive(record)
    found = OutputData(out.uri, record, alive, commits)

    files = [DataFile(out.url(c.data)) for c in commits]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        for done in pool.map(lambda f: _read_data_file(f, storage_options, found), files):
            _merge(found, done)
        errors = [out.url(c.errors) for c in commits if c.errors]
        for dropped in pool.map(lambda url: _read_dropped(url, "error_code", storage_options, found), errors):
            found.errors.merge(dropped)
        filtered = _filtered_files(out, commits)
        for dropped in pool.map(lambda url: _read_dropped(url, FILTER_COLUMN, storage_options, found), filtered):
            found.filtered.merge(dropped)
    found.sample = _sample_texts([f for f in files if f.rows], storage_options, sample_rows, random.Random(seed))
    reference = ((record.get("spec") or {}).get("evaluation") or {}).get("reference_column")
    if reference:
        found.corpus, found.corpus_rows = _corpus_scores([f.url for f in files if f.rows], reference, storage_options)
    return found


def _corpus_scores(urls: list[str], reference: str, storage_options: dict) -> tuple[dict[str, float], int]:
    """Corpus BLEU and chrF (sacreBLEU) of data/'s texts against their references, over the
    first CORPUS_ROWS rows (all of them for most jobs)."""
    import sacrebleu

    texts, references = [], []
    for url in urls:
        if len(texts) >= CORPUS_ROWS:
            break
        try:
            with _open(url, storage_options) as pf:
                if reference not in pf.schema_arrow.names:
                    continue
                table = pf.read(columns=["text", reference], use_threads=False)
        except UNREADABLE:  # gone or unreadable: the data/ pass named it already
            continue
        for text, ref in zip(table.column("text").to_pylist(), table.column(reference).to_pylist()):
            if ref is not None:
                texts.append(text)
                references.append(ref)
    texts, references = texts[:CORPUS_ROWS], references[:CORPUS_ROWS]
    if not texts:
        return {}, 0
    scores = {"bleu": sacrebleu.corpus_bleu(texts, [references]).score,
              "chrf": sacrebleu.corpus_chrf(texts, [references]).score}  # fmt: skip
    return scores, len(texts)


# -- data/ -------------------------------------------------------------------------------------


def _read_data_file(f: DataFile, storage_options: dict, found: OutputData) -> DataFile:
    try:
        return with_retries(lambda: _summarize(f, storage_options), f"reading {f.url}")
    except FileNotFoundError:
        found.missing_files.append(f.url)  # list.append is atomic: safe from the pool's threads
    except UNREADABLE as e:
        _unreadable(found, f.url, e)
    return DataFile(f.url)  # counted as no rows: a half-read file would make the numbers wrong


def _summarize(f: DataFile, storage_options: dict) -> DataFile:
    with _open(f.url, storage_options) as pf:
        names = set(pf.schema_arrow.names)
        id_column = pf.schema_arrow.names[0]  # every data/ file starts with the row id (jobs/core/rows.py)
        metrics = [m for m in EVALUATION_COLUMNS if m in names]
        wanted = ["sample_index", "prompt_tokens", "completion_tokens", "finish_reason", *metrics, *features.COLUMNS]
        if metrics:
            wanted.append(id_column)  # the best of a row's samples
        table = pf.read(columns=[c for c in wanted if c in names], use_threads=False)
        f.rows = table.num_rows
        f.row_groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    f.prompt_tokens = _histogram(table, "prompt_tokens")
    f.completion_tokens = _histogram(table, "completion_tokens")
    if "finish_reason" in table.column_names:
        f.finish_reasons = _value_counts(table.column("finish_reason"))
    if "sample_index" in table.column_names and table.num_rows:
        f.max_sample_index = pc.max(table.column("sample_index")).as_py() or 0
    if metrics:
        f.scores = _scores(table, metrics, id_column)
    f.features = features.summarize(table)
    return f


def _histogram(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.zeros(0, np.int64)
    values = table.column(column).drop_null().to_numpy()
    return np.bincount(np.clip(values, 0, None).astype(np.int64)) if len(values) else np.zeros(0, np.int64)


def _value_counts(column: pa.ChunkedArray) -> Counter:
    counts = pc.value_counts(column.fill_null("(none)"))
    return Counter({v.as_py(): c.as_py() for v, c in zip(counts.field("values"), counts.field("counts"))})


def _scores(table: pa.Table, metrics: list[str], id_column: str) -> Scores:
    s = Scores()
    for m in metrics:
        column = table.column(m)
        s.total[m] = pc.sum(column).as_py() or 0.0
        s.count[m] = len(column) - column.null_count
    if "sample_index" in table.column_names:
        by_sample = table.group_by("sample_index").aggregate([(m, agg) for m in metrics for agg in ("sum", "count")])
        for row in by_sample.to_pylist():
            i = row["sample_index"]
            for m in metrics:
                s.by_sample[i][m] = row[f"{m}_sum"] or 0.0
                s.by_sample_count[i][m] = row[f"{m}_count"]
    # A row's samples all sit in its shard's file (a shard is a range of input rows),
    # so the best of them is found file by file.
    best = table.group_by(id_column).aggregate([(m, "max") for m in metrics])
    for m in metrics:
        column = best.column(f"{m}_max")
        s.best_total[m] = pc.sum(column).as_py() or 0.0
        s.best_count[m] = len(column) - column.null_count
    return s


def _merge(found: OutputData, f: DataFile) -> None:
    found.rows += f.rows
    found.prompt_tokens = add_histograms(found.prompt_tokens, f.prompt_tokens)
    found.completion_tokens = add_histograms(found.completion_tokens, f.completion_tokens)
    found.finish_reasons += f.finish_reasons
    found.max_sample_index = max(found.max_sample_index, f.max_sample_index)
    found.scores.merge(f.scores)
    found.features.merge(f.features)


def _sample_texts(files: list[DataFile], storage_options: dict, n: int, rng: random.Random) -> list[str]:
    """At most `n` texts, from whole row groups picked at random until they hold n rows.

    Reading whole row groups keeps the reads few and large (the cost on object
    stores is per request); the rows of a group are neighbours in the input,
    which is why several groups are read rather than one big one where possible."""
    groups = [(f, i) for f in files for i, rows in enumerate(f.row_groups) if rows]
    rng.shuffle(groups)
    texts: list[str] = []
    for f, i in groups:
        if len(texts) >= n:
            break
        try:
            with _open(f.url, storage_options) as pf:
                column = pf.read_row_group(i, columns=["text"], use_threads=False).column("text")
            texts.extend(t for t in column.to_pylist() if t is not None)
        except UNREADABLE:  # gone or unreadable: the data/ pass named it already
            continue
    return rng.sample(texts, n) if len(texts) > n else texts


# -- errors/ and filtered/ ---------------------------------------------------------------------


def _filtered_files(out: OutputDir, commits: list[CommitRecord]) -> list[str]:
    """The filtered/ files of committed shards: named in the commit record, or by the layout."""
    try:
        present = {posixpath.basename(p) for p in out.fs.ls(posixpath.join(out.root, FILTERED), detail=False)}
    except FileNotFoundError:
        present = set()
    urls = []
    for c in commits:
        relpath = c.filtered or OutputLayout.filtered(c.shard)
        if c.filtered or posixpath.basename(relpath) in present:
            urls.append(out.url(relpath))
    return urls


def _read_dropped(url: str, key_column: str, storage_options: dict, found: OutputData) -> Dropped:
    """Counts by `key_column` of one errors/ or filtered/ file, and its first rows of each key."""
    dropped = Dropped()
    try:
        with _open(url, storage_options) as pf:
            if key_column not in pf.schema_arrow.names:
                return dropped
            table = pf.read(use_threads=False)
    except FileNotFoundError:
        return dropped
    except UNREADABLE as e:
        _unreadable(found, url, e)
        return dropped
    dropped.counts = _value_counts(table.column(key_column))
    dropped.structured = features.structured_kinds(table)
    keys = table.column(key_column).to_pylist()
    for key in dropped.counts:
        first = [i for i, k in enumerate(keys) if (k if k is not None else "(none)") == key][:EXAMPLES]
        dropped.examples[key] = table.take(first).to_pylist()
    return dropped


def _unreadable(found: OutputData, url: str, e: Exception) -> None:
    log.warning("cannot read %s for the report: %s: %s", url, type(e).__name__, e)
    found.unreadable_files.append(f"{url}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _open(url: str, storage_options: dict) -> Iterator[pq.ParquetFile]:
    """A Parquet file through fsspec: only the footer and the column chunks read are fetched."""
    with fsspec.open(url, "rb", **storage_options) as f:
        yield open_parquet(f)
