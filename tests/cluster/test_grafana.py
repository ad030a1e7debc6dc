"""cluster/grafana/bulkgen.json queries exactly the series jobs/core/metrics.py defines,
in the form Grafana imports, by Prometheus' rules for each metric type."""

from __future__ import annotations

import json
import re

import pytest

from jobs.core import metrics as m
from tests.conftest import REPO

DASHBOARD = REPO / "cluster" / "grafana" / "bulkgen.json"
METRIC = re.compile(r"\b(" + re.escape(m.RAY_PREFIX) + r"bulkgen_[a-zA-Z0-9_]+)")
FILTER = '{job_name=~"$job_name"}'
DATASOURCE = "${datasource}"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dashboard) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def sample_names() -> dict[str, m.Series]:
    return {sample: series for series in m.SERIES for sample in series.samples}


def test_the_fields_grafana_needs(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert {"from", "to"} <= set(dashboard["time"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in dashboard["panels"]:
        assert p["type"] in {"stat", "timeseries", "gauge", "bargauge", "state-timeline", "table", "row"}, p["title"]
        assert p["title"]
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")) and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]


def test_the_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    job = variables["job_name"]
    assert job["type"] == "query" and job["datasource"]["uid"] == DATASOURCE
    query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
    assert query == f"label_values({m.JOB_STATE.exported}, {m.JOB_NAME})"


def test_every_queried_metric_is_a_defined_series(dashboard):
    known = sample_names()
    for title, expr in panel_queries(dashboard):
        names = METRIC.findall(expr)
        assert names, f"{title}: {expr} queries no bulkgen series"
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{title}: {unknown} are not series of jobs/core/metrics.py (known: {sorted(known)})"


def test_every_series_is_on_some_panel(dashboard):
    used = {name for _, expr in panel_queries(dashboard) for name in METRIC.findall(expr)}
    unused = [s.exported for s in m.SERIES if not used & set(s.samples)]
    assert not unused, f"series no panel shows: {unused}"


def test_queries_follow_prometheus_rules_for_each_type(dashboard):
    known = sample_names()
    for title, expr in panel_queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{title}: {expr}"
        assert not re.search(r"\bjob\s*=", expr), f"{title}: the label is job_name, never job"
        for match in METRIC.finditer(expr):
            name, series = match.group(1), known[match.group(1)]
            # Every selector picks the dashboard's jobs.
            assert expr[match.end() :].startswith(FILTER), f"{title}: {name} without {FILTER}"
            before = expr[: match.start()]
            if series.kind is m.Kind.COUNTER or name.endswith(("_sum", "_count", "_bucket")):
                # A cumulative series means nothing raw: only its rate or increase does.
                assert re.search(r"\b(rate|increase)\(\s*$", before), f"{title}: {name} outside rate()/increase()"
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in before and "le)" in expr, f"{title}: {name} outside histogram_quantile"


def test_the_checks_catch_a_stray_name():
    assert METRIC.findall('rate(ray_bulkgen_rows_total{job_name=~"$job_name"}[5m])') == ["ray_bulkgen_rows_total"]
    assert "ray_bulkgen_rows_total" not in sample_names()


def test_the_readme_lists_the_series_as_defined():
    text = (REPO / "README.md").read_text()
    start, end = "<!-- metrics:start -->\n", "\n<!-- metrics:end -->"
    assert start in text and end in text, "README.md lost its metrics table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == m.markdown_table(), "regenerate the table with `python -m jobs.core.metrics`"
