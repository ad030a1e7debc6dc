"""Rows that cannot be generated become dead letters with a typed error code, the error
budget decides the job, and `retry-failed` regenerates what failed for transient reasons.
The generation failure is injected: a prefill holding a "POISON" prompt raises."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import JobError, run_job
from tests.conftest import job_dict, write_prompts
from tests.faults.conftest import check_output, cli_env, commit_records, read_record, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.faults]

LONG = "Write a short poem about the sea and the wind. " * 8  # ~200 tokens; the context is 128


def _input(path, n: int, prompts: dict[int, str | None], suffixes: dict[int, str | None] | None = None) -> list[dict]:
    """write_prompts' rows with some prompts (and a `suffix` column's values) replaced."""
    table = pq.read_table(write_prompts(path, n))
    column = table.column("prompt").to_pylist()
    for i, text in prompts.items():
        column[i] = text
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(column, pa.string()))
    suffix = ["." for _ in range(n)]
    for i, text in (suffixes or {}).items():
        suffix[i] = text
    table = table.append_column("suffix", pa.array(suffix, pa.string()))
    pq.write_table(table, path)
    return table.to_pylist()


def test_bad_rows(fault_ray, faults, tiny_model, tmp_path):
    rows = _input(
        tmp_path / "in" / "p.parquet",
        30,
        prompts={2: None, 5: "", 8: "   ", 11: LONG, 17: "POISON pill for the model", 25: "More POISON here"},
        suffixes={5: "", 8: "", 14: None},
    )
    expected = {
        "row-00002": "template_error",  # null prompt: the template cannot fill {prompt}
        "row-00005": "empty_prompt",
        "row-00008": "empty_prompt",  # whitespace only
        "row-00011": "prompt_too_long",
        "row-00014": "template_error",  # null suffix
        "row-00017": "generation_error",
        "row-00025": "generation_error",
    }
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"),
        out,
        tiny_model,
        input={"prompt_column": None, "prompt_template": "{prompt}{suffix}", "pass_through": ["topic"]},
        generation={"max_new_tokens": 16, "do_sample": True, "num_return_sequences": 2, "seed": 7},
        resources={"replicas": 2, "batch_size": 4, "num_cpus": 1},
        shards={"rows_per_shard": 10, "max_failed_fraction": 0.0},
    )
    faults.poison()

    with pytest.raises(JobError, match="error budget") as failure:
        run_job(spec_from_dict(data), progress=False)
    assert "14 of 60 rows failed" in str(failure.value)
    result = check_output(out, [r["id"] for r in rows], n=2)
    assert result.record["state"] == "failed" and result.record["error"]["where"] == "finalizing"
    assert sorted(result.commits) == [0, 1, 2], "every shard is committed even though the job failed"
    assert not result.success

    by_id = {r["id"]: r for r in rows}
    got = {}
    for e in result.errors:
        got.setdefault(e["id"], set()).add((e["sample_index"], e["error_code"]))
        source = by_id[e["id"]]
        # A dead letter carries the input columns, so it can be fixed and run again.
        assert (e["prompt"], e["suffix"], e["topic"]) == (source["prompt"], source["suffix"], source["topic"]), e
        assert e["error"], e
    assert got == {i: {(0, code), (1, code)} for i, code in expected.items()}
    generation_errors = [e["error"] for e in result.errors if e["error_code"] == "generation_error"]
    assert all("injected fault at engine.prefill" in m for m in generation_errors), generation_errors
    assert {r["id"] for r in result.data} == set(by_id) - set(expected)
    c = result.record["counts"]
    assert (c["rows_done"], c["rows_failed"], c["rows_total"]) == (46, 14, 60)

    # Within budget, the same job (the budget is not part of its identity) succeeds as it is.
    attempts = {i: doc["attempt"] for i, doc in result.commits.items()}
    data["shards"]["max_failed_fraction"] = 0.5
    record = run_job(spec_from_dict(data), progress=False)
    assert record.state == "succeeded"
    result = check_output(out, [r["id"] for r in rows], n=2)
    assert result.success
    assert {i: doc["attempt"] for i, doc in result.commits.items()} == attempts


def test_retry_failed(fault_ray, faults, tiny_model, tmp_path, ray_tmpdirs):
    rows = _input(tmp_path / "in" / "p.parquet", 30, prompts={4: "POISON one", 9: "", 23: "POISON two"})
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"),
        out,
        tiny_model,
        generation={"max_new_tokens": 16, "do_sample": True, "num_return_sequences": 2, "seed": 3},
        resources={"replicas": 2, "batch_size": 4, "num_cpus": 1},
        shards={"rows_per_shard": 10, "max_failed_fraction": 0.5},
    )
    faults.poison()
    assert run_job(spec_from_dict(data), progress=False).state == "succeeded"
    first = check_output(out, [r["id"] for r in rows], n=2)
    assert sorted((e["id"], e["sample_index"], e["error_code"]) for e in first.errors) == [
        ("row-00004", 0, "generation_error"),
        ("row-00004", 1, "generation_error"),
        ("row-00009", 0, "empty_prompt"),
        ("row-00009", 1, "empty_prompt"),
        ("row-00023", 0, "generation_error"),
        ("row-00023", 1, "generation_error"),
    ]
    texts = {(r["id"], r["sample_index"]): r["text"] for r in first.data}

    # A new Ray without the fault directory (the CLI's own), so what failed transiently now succeeds.
    faults.clear()
    done = run_cli("retry-failed", out, "--no-progress", env=cli_env(ray_tmpdirs()))
    assert done.returncode == 0, done.stderr[-3000:]
    result = check_output(out, [r["id"] for r in rows], n=2)
    assert result.record["state"] == "succeeded"
    assert sorted((e["id"], e["sample_index"], e["error_code"]) for e in result.errors) == [
        ("row-00009", 0, "empty_prompt"),
        ("row-00009", 1, "empty_prompt"),
    ]
    retried = {(r["id"], r["sample_index"]) for r in result.data} - set(texts)
    assert retried == {(i, s) for i in ("row-00004", "row-00023") for s in (0, 1)}
    assert {k: r["text"] for r in result.data if (k := (r["id"], r["sample_index"])) in texts} == texts
    c = result.record["counts"]
    assert (c["rows_done"], c["rows_failed"]) == (58, 2)
    # Only the shards with dead letters were rewritten.
    assert {i for i, doc in result.commits.items() if doc["attempt"] != first.commits[i]["attempt"]} == {0, 2}
    assert len(commit_records(out)) == 3 and read_record(out)["state"] == "succeeded"


def test_a_prompt_not_utf8_is_one_dead_letter_and_a_corrupt_page_names_its_file(fault_ray, tiny_model, tmp_path):
    from tests.bad_files import corrupt_column, not_utf8

    rows = 20
    table = pq.read_table(write_prompts(tmp_path / "in" / "p.parquet", rows))
    prompts = [p.encode() for p in table.column("prompt").to_pylist()]
    prompts[7] = b"Write \xff a note"
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", not_utf8(prompts))
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    out = str(tmp_path / "out")
    data = job_dict(
        str(tmp_path / "in"), out, tiny_model,
        generation={"max_new_tokens": 4}, resources={"replicas": 1, "num_cpus": 1},
        shards={"rows_per_shard": 10, "max_failed_fraction": 0.1},
    )  # fmt: skip
    assert run_job(spec_from_dict(data), progress=False).state == "succeeded"
    result = check_output(out, [f"row-{i:05d}" for i in range(rows)])
    assert [(e["id"], e["error_code"]) for e in result.errors] == [("row-00007", "bad_encoding")]
    assert len(result.data) == rows - 1

    # A corrupt page outside the id column is found by the replica that reads it: the
    # shard's own error names the file (the job's message names every failed shard's file anyway).
    write_prompts(tmp_path / "in2" / "p.parquet", rows)
    corrupt_column(tmp_path / "in2" / "p.parquet", "prompt")
    data.update(input={**data["input"], "uri": str(tmp_path / "in2")}, output={**data["output"], "uri": out + "2"})
    with pytest.raises(JobError) as failure:
        run_job(spec_from_dict(data), progress=False)
    last_error = str(failure.value).split("last error:")[1]
    assert re.search(r"cannot read rows \d+:\d+ of input file \S*/in2/p\.parquet", last_error), last_error
