"""The input snapshot: what counts as a changed input, and the plan rebuilt from a pinned one
(a grouped plan: computed again and checked against its pinned digest)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from jobs.core.errors import InputChanged
from jobs.core.plan import InputFile, plan
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from jobs.driver import _planned_input
from jobs.output import OutputDir
from jobs.snapshot import InputSnapshot, PinnedFile, changes, version_stamp
from tests.conftest import job_dict, write_augment


def pinned(relpath: str, size: int = 100, version: str = "mtime:1", rows: int | None = 10) -> PinnedFile:
    return PinnedFile(relpath, f"s3://b/in/{relpath}", size, version, rows)


def test_the_same_input_has_no_changes():
    files = [pinned("a.parquet"), pinned("b.parquet")]
    assert changes(files, list(files)) == []


def test_added_removed_and_rewritten_files_are_each_named():
    before = [pinned("a.parquet"), pinned("b.parquet"), pinned("c.parquet")]
    after = [pinned("b.parquet", size=120), pinned("c.parquet"), pinned("d.parquet")]
    lines = changes(before, after)
    assert lines[0].startswith("added:") and lines[0].endswith("/d.parquet")
    assert lines[1].startswith("removed:") and lines[1].endswith("/a.parquet")
    assert lines[2].startswith("rewritten:") and "b.parquet" in lines[2] and "size 100" in lines[2]
    assert len(lines) == 3


def test_a_new_version_stamp_is_a_rewrite_even_at_the_same_size():
    assert changes([pinned("a.parquet", version="ETag:1")], [pinned("a.parquet", version="ETag:2")])


def test_row_counts_count_only_where_both_sides_know_them():
    assert changes([pinned("a.parquet", rows=10)], [pinned("a.parquet", rows=None)]) == []
    assert changes([pinned("a.parquet", rows=10)], [pinned("a.parquet", rows=11)])


def test_version_stamp_prefers_the_stores_own_over_a_time():
    assert version_stamp({"ETag": '"abc"', "LastModified": "x", "size": 1}) == 'ETag:"abc"'
    assert version_stamp({"generation": 7, "etag": "e"}) == "generation:7"
    assert version_stamp({"mtime": 1.5, "size": 3}) == "mtime:1.5"
    assert version_stamp({"size": 3}) is None


def test_the_plan_is_rebuilt_from_the_pinned_files_and_they_survive_json():
    files = (pinned("b.parquet", rows=25), pinned("a.parquet", rows=7), pinned("c.parquet", rows=None))
    snapshot = InputSnapshot(10, files)
    assert snapshot.input_files() == [
        InputFile("s3://b/in/b.parquet", "b.parquet", 25),
        InputFile("s3://b/in/a.parquet", "a.parquet", 7),
        InputFile("s3://b/in/c.parquet", "c.parquet", 0),  # a row count the pin did not know
    ]
    assert [(s.relpath, s.start, s.stop) for s in plan(snapshot.input_files(), snapshot.rows_per_shard)] == [
        ("a.parquet", 0, 7), ("b.parquet", 0, 10), ("b.parquet", 10, 20), ("b.parquet", 20, 25),
    ]
    assert InputSnapshot.from_json(snapshot.to_json()) == snapshot


def test_a_grouped_plans_digest_survives_json_and_a_range_plan_writes_none():
    snapshot = InputSnapshot(10, (pinned("a.parquet"),), plan_digest="0123456789abcdef")
    assert InputSnapshot.from_json(snapshot.to_json()) == snapshot
    assert "plan_digest" not in InputSnapshot(10, (pinned("a.parquet"),)).to_json()  # records as they always were


def test_a_resume_whose_grouped_plan_differs_from_the_pinned_one_is_refused(tmp_path):
    write_augment(tmp_path / "in" / "augment.parquet", 12)
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path / "model",
                                   shards={"rows_per_shard": 10, "group_by_prefix": "on"}))  # fmt: skip
    checked = SimpleNamespace(input_rows=36, files=open_dataset(spec.input).files)
    record, out = SimpleNamespace(input=None), OutputDir(str(tmp_path / "out"), {})
    first, shards = _planned_input(spec, out, record, checked)
    assert first.plan_digest is not None and record.input["plan_digest"] == first.plan_digest
    assert len(shards) == 6 and all(s.group is not None for s in shards)
    again = _planned_input(spec, out, record, checked)
    assert again == (first, shards)  # a resume computes the same plan
    record.input = {**record.input, "plan_digest": "0" * 16}  # as if a release had keyed prompts another way
    with pytest.raises(InputChanged, match="shards grouped by prefix now differ"):
        _planned_input(spec, out, record, checked)
