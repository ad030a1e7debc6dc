"""The report (jobs/report/) on synthetic outputs, without Ray: what it reads, what it says,
and that index.html and report.md say the same thing and stand alone."""

from __future__ import annotations

import json
import posixpath
import re
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from html.parser import HTMLParser

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core import rows as columns
from jobs.core.layout import RECORD, OutputLayout
from jobs.core.storage import write_bytes
from jobs.core.times import now
from jobs.record import Counts, JobRecord, JobState, Run
from jobs.report import write_report
from jobs.report.data import read_output
from jobs.report.diversity import distinct_n, diversity, most_repeated, self_bleu
from jobs.report.features import LOGPROB_EDGES, summarize

PNG = b"\x89PNG\r\n\x1a\n"
SHARDS, ROWS, N = 3, 40, 2  # shards of ROWS input rows, N samples each
ERRORS = {1: [("prompt_too_long", 0), ("prompt_too_long", 1), ("generation_failed", 2)]}  # shard -> (code, row)
FILTERED = {2: [("min_length", 0), ("min_length", 1), ("min_length", 2), ("duplicate", 3)]}
# Each column's type as a job writes it (jobs/core/rows.py), for the columns a test's rows have.
TYPES = {f.name: f.type for f in (*columns.GENERATED, *columns.ERROR_FIELDS, columns.FILTER, columns.REASONING,
                                  columns.REASONING_TOKENS, columns.STRUCTURED, columns.JSON_PARSED, columns.TOKEN_IDS,
                                  columns.TOKEN_LOGPROBS, columns.TOP_LOGPROBS, columns.LOGPROB_SUM, columns.ADAPTER)}


def _text(i: int, s: int) -> str:
    return "the same answer" if i % 5 == 0 else f"answer {i} number {s} has words"


def _data_rows(shard: int, scores: bool, filtered: bool, errors: dict, features) -> list[dict]:
    dropped = {r for _, r in errors.get(shard, []) + (FILTERED.get(shard, []) if filtered else [])}
    rows = []
    for r in range(ROWS):
        i = shard * ROWS + r
        for s in range(N):
            if r in dropped and s == 0:
                continue  # sample 0 of these rows went to errors/ or filtered/
            row = {
                "id": f"row-{i:04d}",
                "sample_index": s,
                "text": _text(i, s),
                "finish_reason": "length" if i % 4 == 0 else "stop",
                "prompt_tokens": 5 + i % 7,
                "completion_tokens": 3 + (i * (s + 1)) % 11,
            }
            if scores:
                row.update(bleu=float(i % 10 + s), chrf=50.0 + s, rouge1=0.5, rouge2=0.25, rougeL=0.4 + 0.1 * s)
            if features:
                row.update(features(i, s, row["completion_tokens"]))
            rows.append(row)
    return rows


def _write_parquet(fs, path: str, rows: list[dict], row_group_size: int = 16) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    table = pa.Table.from_pylist(rows)
    table = table.cast(pa.schema([pa.field(n, TYPES.get(n, t)) for n, t in zip(table.column_names, table.schema.types)]))
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def make_output(uri: str, state: JobState = JobState.SUCCEEDED, scores: bool = False, filtered: bool = False,
                pid: int | None = None, storage_options: dict | None = None, errors: dict = ERRORS,
                features=None) -> dict:
    """A job's output as the driver leaves it: record, commit records, data/, errors/ (and filtered/).
    `errors`: shard -> [(error code, row)]; `features(i, sample_index, completion_tokens) -> dict`: the
    columns of generation features for a sequence of input row i, in data/ and filtered/.
    Returns {"record", "data", "errors", "filtered"}: what was written."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    layout = OutputLayout(uri)
    all_data, all_errors, all_filtered, commits = [], [], [], []
    for shard in range(SHARDS):
        data = _data_rows(shard, scores, filtered, errors, features)
        failed = [{"id": f"row-{shard * ROWS + r:04d}", "sample_index": 0, "error_code": code,
                   "error": f"{code} on row {r}"} for code, r in errors.get(shard, [])]
        dropped = [{"id": f"row-{shard * ROWS + r:04d}", "sample_index": 0, "text": f"short {r}", "filter": name,
                    **(features(shard * ROWS + r, 0, 3) if features else {})}
                   for name, r in (FILTERED.get(shard, []) if filtered else [])]
        _write_parquet(fs, posixpath.join(root, layout.data(shard)), data)
        if failed:
            _write_parquet(fs, posixpath.join(root, layout.errors(shard)), failed)
        if dropped:
            _write_parquet(fs, posixpath.join(root, layout.filtered(shard)), dropped)
        all_data += data
        all_errors += failed
        all_filtered += dropped
        commits.append({
            "shard": shard, "name": f"part-{shard:05d}", "data": layout.data(shard),
            "errors": layout.errors(shard) if failed else None,
            "rows_done": len(data), "rows_failed": len(failed), "rows_cached": 7 if shard == 0 else 0,
            "rows_filtered": len(dropped),
            "prompt_tokens": sum(r["prompt_tokens"] for r in data),
            "completion_tokens": sum(r["completion_tokens"] for r in data),
            "committed_at": f"2026-01-01T00:00:{10 + 5 * shard:02d}.000+00:00", "seconds": 4.0 + shard,
            "replica_pid": 100 + shard % 2,
        })
        write_bytes(layout.url(layout.commit(shard)), json.dumps(commits[-1]).encode(), storage_options or {})

    counts = Counts(
        input_rows=SHARDS * ROWS, rows_total=SHARDS * ROWS * N, rows_done=len(all_data), rows_failed=len(all_errors),
        rows_cached=7, shards_total=SHARDS + 1, shards_committed=SHARDS,
        prompt_tokens=sum(r["prompt_tokens"] for r in all_data),
        completion_tokens=sum(r["completion_tokens"] for r in all_data),
    )
    run = Run(started_at="2026-01-01T00:00:00.000+00:00", ray_address="local", pid=pid or 1, host=socket.gethostname(),
              replica_plan={"asked": "auto", "launched": 2, "expected": 2, "how": "auto"})
    record = JobRecord(spec={"name": "synthetic"}, fingerprint="0123456789abcdef", name="synthetic", state=state,
                       counts=counts, runs=[run], started_at="2026-01-01T00:00:02.000+00:00",
                       model={"path": "models/tiny", "replica": {"engine": "transformers", "engine_version": "5.19.0"}})
    doc = record.to_json()
    if filtered:
        doc["counts"]["rows_filtered"] = len(all_filtered)
    if state.final:
        doc["finished_at"] = "2026-01-01T00:00:32.000+00:00"
    if state is JobState.FAILED:
        doc["error"] = {"message": "shard part-00003 failed 3 times: boom", "where": "running"}
    doc["updated_at"] = doc["finished_at"] if state.final else now()
    write_bytes(layout.url(RECORD), json.dumps(doc).encode(), storage_options or {})
    return {"record": doc, "data": all_data, "errors": all_errors, "filtered": all_filtered}


class Page(HTMLParser):
    """What a test needs of index.html: headline values, images, links, notice, section titles."""

    def __init__(self, text: str):
        super().__init__()
        self.facts: dict[str, str] = {}
        self.images: list[dict] = []
        self.links: list[str] = []
        self.notice = None
        self.titles: list[str] = []
        self._into: tuple | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])
        if "data-headline" in attrs:
            self._into = ("fact", attrs["data-headline"])
        elif attrs.get("id") == "notice":
            self._into = ("notice", None)
        elif tag == "h2":
            self._into = ("title", None)

    def handle_data(self, data):
        if self._into is None:
            return
        kind, key = self._into
        if kind == "fact":
            self.facts[key] = data
        elif kind == "notice":
            self.notice = data
        else:
            self.titles.append(data)
        self._into = None


def _read(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.cat_file(path)


# -- the whole report ----------------------------------------------------------------------------


def test_report_of_a_finished_job(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri)
    written = write_report(uri, {})
    page = Page(_read(written.html).decode())
    c = made["record"]["counts"]

    # The job at a glance equals the record.
    assert page.facts["state"] == "succeeded"
    assert page.facts["rows_generated"] == f"{c['rows_done'] - 7:,}" and page.facts["rows_cached"] == "7"
    assert page.facts["rows_failed"] == str(len(made["errors"])) == "3"
    assert page.facts["rows_total"] == f"{SHARDS * ROWS * N:,}"
    assert page.facts["shards"] == f"{SHARDS}/{SHARDS + 1}"
    assert page.facts["completion_tokens"] == f"{c['completion_tokens']:,}"
    assert page.facts["wall_time"] == "30.0 s"  # started_at 00:00:02 -> finished_at 00:00:32
    assert page.facts["tokens_per_second"] == f"{c['completion_tokens'] / 30:,.1f}"
    assert page.facts["engine"] == "transformers 5.19.0" and page.facts["model"] == "models/tiny"
    assert page.facts["replicas"] == "2"
    assert page.notice is None  # a succeeded job needs no warning
    assert page.titles == ["Throughput", "Prompt and completion lengths", "Finish reasons", "Errors",
                           "Repeats and diversity"]

    # Self-contained: every image inline, nothing fetched from anywhere.
    assert {i["data-figure"] for i in page.images} == {"throughput", "replicas", "lengths", "finish_reasons",
                                                      "error_codes"}
    assert all(link.startswith("data:image/png;base64,") for link in page.links), page.links

    # report.md says the same and links the PNGs written beside it.
    md = _read(written.markdown).decode()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(f"figures/{i['data-figure']}.png" for i in page.images)
    for relpath in linked:
        assert _read(f"{uri}/_report/{relpath}").startswith(PNG)
    for value in page.facts.values():
        assert f"| {value} |" in md
    for title in page.titles:
        assert f"## {title}" in md


def test_counts_are_exact_and_errors_have_examples(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri)
    d = read_output(uri, {})
    data = made["data"]
    assert d.rows == len(data)
    assert d.finish_reasons == Counter(r["finish_reason"] for r in data)
    assert d.completion_tokens.sum() == len(data)
    assert d.completion_tokens.tolist() == [sum(1 for r in data if r["completion_tokens"] == n)
                                            for n in range(max(r["completion_tokens"] for r in data) + 1)]
    assert d.errors.counts == Counter({"prompt_too_long": 2, "generation_failed": 1})
    assert [r["error"] for r in d.errors.examples["prompt_too_long"]] == ["prompt_too_long on row 0",
                                                                          "prompt_too_long on row 1"]
    md = _read(write_report(uri, {}).markdown).decode()
    assert "| generation_failed | row-0042, 0 | generation_failed on row 2 |" in md


def test_texts_are_sampled_and_the_rest_still_counted(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri)
    d = read_output(uri, {}, sample_rows=50)
    assert len(d.sample) == 50
    assert Counter(d.sample) <= Counter(r["text"] for r in made["data"])  # real texts, none twice too often
    assert d.rows == len(made["data"])  # the cheap columns are read in full
    assert read_output(uri, {}, sample_rows=50).sample == d.sample  # a fixed seed: the same report twice
    md = _read(write_report(uri, {}, sample_rows=50).markdown).decode()
    assert f"Measured on a random sample of 50 of {len(made['data']):,} generated texts." in md


def test_evaluation_and_filtered_sections_appear_with_their_data(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri, scores=True, filtered=True)
    d = read_output(uri, {})
    data = made["data"]

    by_metric = {m: [r[m] for r in data] for m in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")}
    assert d.scores.metrics == list(by_metric)
    for m, values in by_metric.items():
        assert d.scores.total[m] / d.scores.count[m] == pytest.approx(sum(values) / len(values))
    best = defaultdict(float)
    for r in data:
        best[r["id"]] = max(best[r["id"]], r["bleu"])
    assert d.scores.best_total["bleu"] / d.scores.best_count["bleu"] == pytest.approx(sum(best.values()) / len(best))
    sample1 = [r["chrf"] for r in data if r["sample_index"] == 1]
    assert d.scores.by_sample[1]["chrf"] / d.scores.by_sample_count[1]["chrf"] == pytest.approx(51.0)
    assert len(sample1) == d.scores.by_sample_count[1]["chrf"]
    assert d.filtered.counts == Counter({"min_length": 3, "duplicate": 1})

    page = Page(_read(write_report(uri, {}).html).decode())
    assert "Evaluation" in page.titles and "Filtered rows" in page.titles
    assert page.facts["rows_filtered"] == "4"
    assert {"filters", "scores_by_sample"} <= {i["data-figure"] for i in page.images}
    md = _read(f"{uri}/_report/report.md").decode()
    assert f"| bleu | {sum(by_metric['bleu']) / len(data):.2f} | {sum(best.values()) / len(best):.2f} |" in md
    assert "| duplicate | row-0083, 0 | short 3 |" in md


# -- the columns of generation features ------------------------------------------------------

STRUCTURED_ERRORS = {0: [("structured_incomplete", 3), ("structured_invalid", 5)],
                     1: [("bad_schema", 7), ("prompt_too_long", 8), ("structured_incomplete", 9)]}


def _features(i: int, s: int, completion_tokens: int) -> dict:
    """Logprobs, adapter, structured output and reasoning of a sequence, as their stages write them."""
    mean = -12.05 if i % 37 == 1 else -((i * 7 + s) % 60) / 10 - 0.05  # mid-bin; one below -10
    asked = i % 11 != 0  # a batch line that asked for no logprobs: nulls
    thinking = 0 if i % 4 == 0 else min(i % 5 + 1, completion_tokens)
    kind = ("json_schema", "regex", None)[i % 3]
    return {
        "token_ids": list(range(completion_tokens)) if asked else None,
        "token_logprobs": [mean] * completion_tokens if asked else None,
        "logprob_sum": mean * completion_tokens if asked else None,
        "adapter": ("formal", "casual", None)[(i + s) % 3],
        "structured": kind,
        "json_parsed": (i % 13 != 0) if kind == "json_schema" else None,
        "reasoning": f"thinking about {i}" if thinking else None,
        "reasoning_tokens": thinking,
    }


def _upper_edge_quantile(values: list[float], q: float) -> float:
    """The report's quantile, found another way: the lowest upper bin edge with a share q of
    the values (clipped to the bins' range) below it."""
    clipped = [max(v, LOGPROB_EDGES[0]) for v in values]
    return next(e for e in LOGPROB_EDGES[1:] if sum(v < e for v in clipped) >= q * len(values))


def test_the_columns_of_generation_features_are_counted_and_shown(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri, filtered=True, errors=STRUCTURED_ERRORS, features=_features)
    data, dropped = made["data"], made["filtered"]
    written = write_report(uri, {})
    page = Page(_read(written.html).decode())
    md = _read(written.markdown).decode()
    assert page.titles == ["Throughput", "Prompt and completion lengths", "Finish reasons", "Errors", "Filtered rows",
                           "Structured output", "Log-probabilities", "Adapters", "Reasoning", "Repeats and diversity"]

    # Structured output: rows that kept their constraint (data/ and filtered/) against its dead letters.
    kinds = Counter(r["structured"] for r in data + dropped if r["structured"] is not None)
    valid, dead = sum(kinds.values()), {"structured_incomplete": 2, "structured_invalid": 1, "bad_schema": 1}
    asked = valid + sum(dead.values())
    assert f"{valid:,} of {asked:,} completions that asked for a constraint satisfied it: a valid rate of " \
           f"{valid / asked:.1%}." in md
    assert f"| valid | {valid:,} | {valid / asked:.1%} | in data/ or filtered/ |" in md
    for code, n in dead.items():
        assert f"| {code} | {n} | {n / asked:.1%} | " in md
    assert "| prompt_too_long |" not in md.split("## Structured output")[1].split("##")[0]  # not structured's
    for kind, n in kinds.items():
        assert f"| {kind} | {n:,} | {n / valid:.1%} |" in md
    parsed = Counter(r["json_parsed"] for r in data if r["json_parsed"] is not None)
    assert f"{parsed[True]:,} parse as JSON and {parsed[False]:,} do not." in md

    # Log-probabilities: each row's mean over data/'s rows that have them.
    means = [r["logprob_sum"] / r["completion_tokens"] for r in data if r["logprob_sum"] is not None]
    assert 0 < len(means) < len(data) and min(means) < LOGPROB_EDGES[0]
    quantiles = " | ".join(f"{_upper_edge_quantile(means, q):.1f}" for q in (0.1, 0.5, 0.9))
    assert f"| {len(means):,} | {sum(means) / len(means):.3f} | {quantiles} |" in md

    # Adapters: rows in data/ per adapter, the base model's too.
    adapters = Counter(r["adapter"] or "(base)" for r in data)
    assert len(adapters) == 3
    for name, n in adapters.items():
        assert f"| {name} | {n:,} | {n / len(data):.1%} |" in md

    # Reasoning: rows with thinking, and the thinking's share of the completion tokens.
    thinking = [r["reasoning_tokens"] for r in data if r["reasoning_tokens"]]
    completion = sum(r["completion_tokens"] for r in data)
    assert f"{len(thinking):,} of {len(data):,} rows thought before answering ({len(thinking) / len(data):.1%})" in md
    assert f"The thinking took {sum(thinking):,} of their {completion:,} completion tokens " \
           f"({sum(thinking) / completion:.1%})." in md
    assert f"| per row with thinking | {sum(thinking) / len(thinking):.1f} |" in md

    figures = {i["data-figure"] for i in page.images}
    assert {"mean_logprobs", "adapters"} <= figures
    for name in ("mean_logprobs", "adapters"):
        assert _read(f"{uri}/_report/figures/{name}.png").startswith(PNG)


def test_feature_columns_count_only_rows_that_have_a_value():
    table = pa.table({
        "completion_tokens": pa.array([4, 0, 2, 5], pa.int32()),
        "logprob_sum": pa.array([-2.0, 0.0, None, -100.0]),  # no tokens: no mean; null: not asked
        "adapter": pa.array([None, "a", "a", None], pa.string()),
        "structured": pa.array([None, "choice", None, "choice"], pa.string()),
        "reasoning_tokens": pa.array([0, None, 2, 3], pa.int32()),
    })
    f = summarize(table)
    assert f.present == {"logprob_sum", "adapter", "structured", "reasoning_tokens"}
    assert f.logprob_rows == 2 and f.mean_logprob_total == pytest.approx(-0.5 - 20.0)
    assert f.mean_logprobs[0] == 1  # -20 per token: the first bin
    assert f.mean_logprobs[int((-0.5 - LOGPROB_EDGES[0]) / 0.1 + 1e-9)] == 1
    assert f.adapters == Counter({"(base)": 2, "a": 2}) and f.structured == Counter({"choice": 2})
    assert f.json_parsed == Counter()  # no column, nothing counted
    assert f.reasoning_rows == 3 and f.reasoning_completion_tokens == 4 + 2 + 5
    assert f.thinking_tokens == 5 and f.reasoning_tokens.sum() == 2  # two rows thought


def test_a_feature_whose_column_has_no_value_says_so(tmp_path):
    uri = str(tmp_path / "out")
    make_output(uri, features=lambda i, s, n: {"logprob_sum": None, "structured": None})
    md = _read(write_report(uri, {}).markdown).decode()
    assert "## Log-probabilities\n\nNo row in data/ has logprobs." in md
    assert "## Structured output\n\nNo row asked for structured output." in md
    assert "## Adapters" not in md and "## Reasoning" not in md


def test_a_running_job_is_reported_so_far(tmp_path):
    uri = str(tmp_path / "out")
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for a live driver
    try:
        made = make_output(uri, JobState.RUNNING, pid=driver.pid)
        written = write_report(uri, {})
    finally:
        driver.kill()
        driver.wait()
    assert written.state == "running"
    assert written.notice.startswith(f"running: a report of the {SHARDS} of {SHARDS + 1} shards committed so far")
    page = Page(_read(written.html).decode())
    assert page.notice == written.notice and page.facts["state"] == "running"
    assert page.facts["rows_generated"] == f"{made['record']['counts']['rows_done'] - 7:,}"

    # The same record once its driver is gone says so, and what to do.
    gone = write_report(uri, {})
    assert "its driver is gone" in gone.notice and "bulkgen resume" in gone.notice


def test_a_running_job_is_counted_from_its_commit_records(tmp_path):
    """The driver saves the record at most once a second after a commit: a report read in
    between counts the commit records it reads, so its notice and facts agree with its shards."""
    uri = str(tmp_path / "out")
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for a live driver
    try:
        made = make_output(uri, JobState.RUNNING, pid=driver.pid)
        stale = made["record"]  # as saved before the last shard committed
        stale["counts"].update(shards_committed=SHARDS - 1, rows_done=0, rows_cached=0, completion_tokens=0)
        write_bytes(f"{uri}/{RECORD}", json.dumps(stale).encode(), {})
        written = write_report(uri, {})
    finally:
        driver.kill()
        driver.wait()
    assert written.notice.startswith(f"running: a report of the {SHARDS} of {SHARDS + 1} shards committed so far")
    page = Page(_read(written.html).decode())
    assert page.facts["shards"] == f"{SHARDS}/{SHARDS + 1}"
    assert page.facts["rows_generated"] == f"{len(made['data']) - 7:,}"
    assert page.facts["completion_tokens"] == f"{sum(r['completion_tokens'] for r in made['data']):,}"


def test_a_failed_job_says_failed_with_its_error(tmp_path, capsys):
    from jobs.cli import main

    uri = str(tmp_path / "out")
    make_output(uri, JobState.FAILED)
    assert main(["report", uri]) == 0
    printed = capsys.readouterr().out
    assert "state:    failed (while running): shard part-00003 failed 3 times: boom" in printed
    page = Page((tmp_path / "out" / "_report" / "index.html").read_text())
    assert page.facts["state"] == "failed" and "boom" in page.notice
    assert "> **failed (while running): shard part-00003 failed 3 times: boom" in (
        tmp_path / "out" / "_report" / "report.md").read_text()


def test_cli_refuses_a_directory_that_is_no_output(tmp_path, capsys):
    from jobs.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "no job record" in capsys.readouterr().err


def test_a_job_with_nothing_committed_yet(tmp_path):
    uri = str(tmp_path / "out")
    fs = fsspec.filesystem("file")
    fs.makedirs(uri)
    doc = JobRecord(spec={}, fingerprint="0" * 16, name="empty", state=JobState.VALIDATING,
                    runs=[Run(pid=1)]).to_json()
    (tmp_path / "out" / "_job.json").write_text(json.dumps(doc))
    written = write_report(uri, {})
    page = Page(_read(written.html).decode())
    assert written.notice.startswith("validating: the job has not started generating")
    assert page.images == [] and page.facts["wall_time"] == "-"


def test_a_report_on_object_storage(tmp_path):
    uri = "memory://bulkgen-report-test/out"
    made = make_output(uri)
    try:
        page = Page(_read(write_report(uri, {}).html).decode())
        assert page.facts["rows_failed"] == str(len(made["errors"]))
        assert _read(f"{uri}/_report/figures/lengths.png").startswith(PNG)
    finally:
        fsspec.filesystem("memory").rm("/bulkgen-report-test", recursive=True)


def test_a_new_report_drops_figures_the_old_one_had(tmp_path):
    uri = str(tmp_path / "out")
    make_output(uri)
    write_report(uri, {})
    assert (tmp_path / "out/_report/figures/error_codes.png").exists()
    for p in (tmp_path / "out" / "errors").iterdir():  # as retry-failed would leave it
        p.unlink()
    for p in (tmp_path / "out" / "_commits").iterdir():
        doc = json.loads(p.read_text())
        p.write_text(json.dumps({**doc, "errors": None, "rows_failed": 0}))
    write_report(uri, {})
    assert not (tmp_path / "out/_report/figures/error_codes.png").exists()


# -- diversity ---------------------------------------------------------------------------------


def test_distinct_n_counts_distinct_ngrams():
    words = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(words, 1) == 2 / 5
    assert distinct_n(words, 2) == 2 / 3  # (a b), (b a), (a b)
    assert distinct_n([[]], 1) is None


def test_self_bleu_is_sacrebleus_and_high_for_alike_texts():
    from sacrebleu.metrics import BLEU

    texts = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on a mat"]
    bleu = BLEU(effective_order=True)
    expected = sum(bleu.sentence_score(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)) / 3
    assert self_bleu(texts) == pytest.approx(expected)
    assert self_bleu(["same words here"] * 4) == pytest.approx(100.0)
    assert self_bleu(["alone"]) is None


def test_diversity_and_repeats_of_a_sample():
    texts = ["x y z", "x y z", "", "  x y z ", "p q"]
    d = diversity(texts)
    assert d.texts == 5 and d.empty == 1 and d.self_bleu_texts == 4
    assert most_repeated(texts) == [("x y z", 3)]


# -- the driver's hook ---------------------------------------------------------------------------


def _driver_run(tmp_path, uri: str, report: bool):
    from jobs.core.spec import spec_from_dict
    from jobs.driver import _Run
    from jobs.output import OutputDir
    from jobs.record import JobRecord

    spec = spec_from_dict({"input": {"uri": str(tmp_path / "in.parquet"), "prompt_column": "p"},
                           "model": {"path": "m"}, "output": {"uri": uri, "report": report}})
    run = object.__new__(_Run)  # only what _write_report uses: no Ray, no replicas
    run.spec, run.out = spec, OutputDir(uri, {})
    run.record = JobRecord(spec={}, fingerprint="f")
    run.record.start_run(None)
    return run


def test_the_driver_writes_the_report_unless_turned_off(tmp_path):
    uri = str(tmp_path / "out")
    make_output(uri)
    _driver_run(tmp_path, uri, report=False)._write_report()
    assert not (tmp_path / "out" / "_report").exists()
    run = _driver_run(tmp_path, uri, report=True)
    run._write_report()
    assert (tmp_path / "out" / "_report" / "index.html").exists()
    assert "report_written" in run.record.run.timeline


def test_a_report_that_fails_does_not_fail_the_job(tmp_path, caplog):
    uri = str(tmp_path / "nothing-here")  # no record: building the report raises
    _driver_run(tmp_path, uri, report=True)._write_report()
    assert "could not write the job's report" in caplog.text and "no job record" in caplog.text


def test_output_report_is_on_by_default_and_not_part_of_the_fingerprint(tmp_path):
    from jobs.core.spec import spec_from_dict

    def spec(**output):
        return spec_from_dict({"input": {"uri": "in.parquet", "prompt_column": "p"}, "model": {"path": "m"},
                               "output": {"uri": "out", **output}})

    assert spec().output.report is True
    assert spec(report=False).fingerprint() == spec().fingerprint()  # turning it off resumes the same job


def test_a_committed_file_gone_while_reading_is_reported_not_fatal(tmp_path):
    uri = str(tmp_path / "out")
    made = make_output(uri)
    (tmp_path / "out" / "data" / "part-00001.parquet").unlink()  # retry-failed replacing it right now
    d = read_output(uri, {})
    assert d.missing_files == [f"{uri}/data/part-00001.parquet"]
    assert d.rows == len(made["data"]) - sum(1 for r in made["data"] if ROWS <= int(r["id"][4:]) < 2 * ROWS)
    assert "1 committed files were gone when read" in _read(write_report(uri, {}).markdown).decode()


def test_the_facts_show_prompt_tokens_reused_by_either_engine_over_every_run():
    from jobs.report.content import facts

    def reuse(*runs):
        shown = {f.key: f.value for f in facts({"runs": list(runs)})}
        return shown.get("prefix_reuse")

    vllm = {"replicas": {"1": {"prompt_tokens": 600, "cached_prompt_tokens": 150}}}
    resumed = {"replicas": {"2": {"prompt_tokens": 400, "cached_prompt_tokens": 350}}}
    assert reuse(vllm, resumed) == "500 (50.0% of 1,000) from vLLM's prefix cache"
    # The transformers engine counts no prompt tokens of its own: the count alone.
    shared = {"replicas": {"3": {"forward_tokens": 900, "prefix_shared_tokens": 256}}}
    assert reuse(shared) == "256 prefilled once for rows sharing a prefix"
    assert reuse({"replicas": {"4": {"forward_tokens": 900}}}) is None  # no engine counted reuse: no line
