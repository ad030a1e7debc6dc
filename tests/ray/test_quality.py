"""Evaluation against references and quality filters, on the demo model through Ray:
the scores in data/ are the libraries' own, and every dropped sequence lands in
filtered/ with the filter that dropped it (each (id, sample_index) exactly once)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import REPO
from tests.ray.conftest import assert_exactly_once

pytestmark = pytest.mark.ray

DEMO_MODEL = REPO / "examples" / "demo" / "model"
TOPICS = ["reading a file", "a list of numbers", "the return value", "an empty string"]


def write_input(path: Path, rows: int, repeat_every: int = 0) -> list[str]:
    """Prompts with a reference each; with `repeat_every`, every k-th row repeats row 0's prompt."""
    prompts = [f"Write a short note about {TOPICS[i % 4]} number {i}." for i in range(rows)]
    if repeat_every:
        prompts = [prompts[0] if i % repeat_every == 0 else p for i, p in enumerate(prompts)]
    ids = [f"q{i:03d}" for i in range(rows)]
    references = [f"This function returns {TOPICS[i % 4]} if the file is empty." for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "reference": references}), path)
    return ids


def job(tmp_path: Path, **sections) -> dict:
    return {
        "input": {"uri": str(tmp_path / "in" / "p.parquet"), "prompt_column": "prompt", "id_column": "id"},
        "model": {"path": str(DEMO_MODEL), "engine": "transformers"},
        "generation": {"max_new_tokens": 12, "do_sample": False},
        "output": {"uri": str(tmp_path / "out")},
        "resources": {"replicas": 1},
        "shards": {"rows_per_shard": 8},
        **sections,
    }


def test_scores_are_the_libraries_own(ray_cluster, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    ids = write_input(tmp_path / "in" / "p.parquet", 16)
    record = run_job(spec_from_dict(job(tmp_path, evaluation={"reference_column": "reference"})), progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, ids, n=1)
    assert record.counts.rows_done == 16
    references = {f"q{i:03d}": f"This function returns {TOPICS[i % 4]} if the file is empty." for i in range(16)}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for row in out.data:
        ref = references[row["id"]]
        assert row["bleu"] == pytest.approx(sacrebleu.sentence_bleu(row["text"], [ref]).score)
        assert row["chrf"] == pytest.approx(sacrebleu.sentence_chrf(row["text"], [ref]).score)
        rouge = scorer.score(ref, row["text"])
        for name in ("rouge1", "rouge2", "rougeL"):
            assert row[name] == pytest.approx(rouge[name].fmeasure)
    assert len({row["bleu"] for row in out.data}) > 1  # scores differ by row: not a constant

    # Overall, in the report: sacreBLEU's corpus scores of the same rows.
    from jobs.report.data import read_output

    texts = [row["text"] for row in out.data]
    refs = [references[row["id"]] for row in out.data]
    report = read_output(str(tmp_path / "out"), {})
    assert report.corpus_rows == 16
    assert report.corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu(texts, [refs]).score)
    assert report.corpus["chrf"] == pytest.approx(sacrebleu.corpus_chrf(texts, [refs]).score)
    assert "Corpus scores" in (tmp_path / "out" / "_report" / "report.md").read_text()


def test_filtered_rows_land_in_filtered_with_their_reasons(ray_cluster, tmp_path):
    # top_k 1 with n=2: a row's two samples are the same text (a duplicate within the row);
    # rows 0, 5, 10 have the same prompt (duplicates across the job, whichever shard runs first).
    ids = write_input(tmp_path / "in" / "p.parquet", 24, repeat_every=5)
    filters = {"min_completion_tokens": 3, "must_not_match": r"\bdefault\b", "deduplicate": "exact"}
    spec = job(tmp_path, filters=filters)
    spec["generation"].update(num_return_sequences=2, do_sample=True, top_k=1)
    record = run_job(spec_from_dict(spec), progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, ids, n=2)

    assert out.filtered, "nothing was filtered"
    assert record.counts.rows_filtered == len(out.filtered)
    assert record.counts.rows_done == len(out.data)
    reasons = {row["filter"] for row in out.filtered}
    assert reasons <= {"empty", "min_completion_tokens", "must_not_match", "prompt_echo", "duplicate"}
    assert "duplicate" in reasons
    for row in out.filtered:  # each reason holds for its row
        if row["filter"] == "min_completion_tokens":
            assert row["completion_tokens"] < 3
        elif row["filter"] == "must_not_match":
            assert re.search(r"\bdefault\b", row["text"])
    for row in out.data:  # and no kept row breaks a rule
        assert row["completion_tokens"] >= 3 and not re.search(r"\bdefault\b", row["text"])
    kept = [" ".join(re.findall(r"\w+", row["text"].lower())) for row in out.data]
    assert len(kept) == len(set(kept)), "a duplicate was kept"
    # Within a row: sample 1 repeats sample 0, so it never stays beside it.
    by_row = {}
    for row in out.data:
        by_row.setdefault(row["id"], []).append(row["sample_index"])
    assert all(samples == [0] for samples in by_row.values()), by_row
