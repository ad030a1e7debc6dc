"""Input data pyarrow reads without complaint but bulkgen cannot use as given: ids that
identify no row (NaN, null, not UTF-8), corrupt pages, and strings that are not UTF-8.
Ids and corrupt id pages are refused before anything heavy starts (exit 2); a prompt
that is not UTF-8 is one row's dead letter, and validate says so."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.errors import InputError
from jobs.validate import validate, validate_report
from tests.bad_files import corrupt_column, not_utf8
from tests.conftest import job_dict, write_job, write_prompts
from tests.jobs.test_bad_input import cli_refuses, fails_early, make_spec, nothing_heavy_starts  # noqa: F401


def single_file_spec(tmp_path, tiny_model, table: pa.Table):
    pq.write_table(table, tmp_path / "in.parquet")
    return make_spec(tmp_path, tiny_model, input={"uri": str(tmp_path / "in.parquet")})


def test_a_nan_id_is_refused_naming_its_file_and_row(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    table = pa.table({"id": [0.5, 1.5, 2.5, math.nan], "prompt": ["p"] * 4, "topic": ["t"] * 4})
    spec = single_file_spec(tmp_path, tiny_model, table)
    fails_early(spec, InputError, "input.id_column", "'id'", "NaN", "row 3 of", "in.parquet")
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out2"), tiny_model))
    cli_refuses(job, capsys, "NaN", "row 3 of", "in.parquet")


def test_an_id_not_utf8_is_refused_naming_its_file_and_row(tmp_path, tiny_model, nothing_heavy_starts):
    table = pa.table({"id": not_utf8([b"a", b"b\xff"]), "prompt": ["p"] * 2, "topic": ["t"] * 2})
    spec = single_file_spec(tmp_path, tiny_model, table)
    fails_early(spec, InputError, "input.id_column", "not valid UTF-8", "row 1 of", "in.parquet")


def test_a_corrupt_page_of_the_id_column_is_refused_naming_its_file(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    write_prompts(tmp_path / "in" / "b.parquet", 6, start=6)
    corrupt_column(tmp_path / "in" / "b.parquet", "id")
    spec = make_spec(tmp_path, tiny_model)
    message = fails_early(spec, InputError, "b.parquet", "not readable Parquet", "input.id_column")
    assert "a.parquet" not in message
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in"), str(tmp_path / "out2"), tiny_model))
    cli_refuses(job, capsys, "b.parquet", "not readable Parquet")


def test_validate_names_a_corrupt_page_outside_the_id_column(tmp_path, tiny_model, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    corrupt_column(tmp_path / "in" / "a.parquet", "prompt")
    spec = make_spec(tmp_path, tiny_model)
    validate(spec)  # the footers and ids read fine; only the scan of the rows finds it
    with pytest.raises(InputError, match=r"cannot read rows 0:6 of input file .*a\.parquet"):
        validate_report(spec)


def test_validate_lists_a_prompt_not_utf8_under_would_fail(tmp_path, tiny_model, capsys):
    from jobs.cli import main

    prompts = [b"Write a note", b"Write \xff a note", b"Write another"]
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "prompt": not_utf8(prompts), "topic": ["t"] * 3}), tmp_path / "in.parquet"
    )
    spec = make_spec(tmp_path, tiny_model, input={"uri": str(tmp_path / "in.parquet")})
    report = validate_report(spec)
    assert dict(report.would_fail) == {"bad_encoding": 1}
    assert report.examples["bad_encoding"][0] == "b"
    assert report.scanned == 3 and len(report.prompt_tokens) == 2
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model))
    assert main(["validate", str(job)]) != 1  # 1: an internal error
    out, err = capsys.readouterr()
    assert "bad_encoding: 1 rows, e.g. b: not valid UTF-8: column 'prompt'" in out + err
    assert "internal error" not in err
