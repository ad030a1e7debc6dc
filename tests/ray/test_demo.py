"""The README's demo job runs as shipped: the model in the repo writes words, not byte noise."""

import re

import pyarrow.dataset as ds
import pytest

from jobs.driver import run_job
from jobs.core.spec import load_spec
from tests.conftest import REPO


@pytest.mark.ray
def test_demo_job_generates_readable_text(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo's paths are relative to the repo, as in the README
    spec = load_spec(REPO / "examples/demo/job.yaml", [f"output.uri={tmp_path / 'demo'}"])
    record = run_job(spec, progress=False)
    assert record.state == "succeeded" and record.counts.rows_done == 300
    # Its resources are the defaults: one replica per CPU of this 2-CPU Ray, and both did work.
    assert record.run.replica_plan["launched"] == 2, record.run.replica_plan
    assert len(record.run.replicas) == 2, record.run.replicas

    texts = ds.dataset(str(tmp_path / "demo" / "data"), format="parquet").to_table().column("text").to_pylist()
    words = [w for t in texts for w in re.findall(r"[A-Za-z]+", t)]
    letters = sum(len(w) for w in words)
    characters = sum(len(t) for t in texts)
    assert letters / characters > 0.6, "the demo model writes mostly non-letters"
    # Real English words: the most common ones a docstring model must have learned.
    common = {"the", "a", "is", "of", "to", "and", "if", "be", "file", "return"}
    assert len(common & {w.lower() for w in words}) >= 6
