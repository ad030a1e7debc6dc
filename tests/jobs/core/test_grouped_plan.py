"""shards.group_by_prefix: the grouped plan is pure and deterministic, a key's rows share
shards that never mix keys or files, and every row is in exactly one shard, by its index."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.plan import MIN_GROUP_ROWS, InputFile, Shard, plan, plan_digest, plan_grouped
from jobs.core.prefix import PREFIX_CHARS, text_prefix_key
from jobs.core.protocol import CommitRecord, Tally
from jobs.core.rows import derived_id, row_ids
from jobs.core.spec import InputSpec, spec_from_dict
from jobs.core.storage import read_rows
from jobs.dataset import prefix_keys, prompt_key_text
from tests.conftest import job_dict


def shuffled_keys(n: int, groups: int, seed: int = 0) -> list[int | None]:
    keys = [1000 + i % groups for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


def grouped(sizes_and_keys: dict[str, list], rows_per_shard: int) -> tuple[list[Shard], list[InputFile]]:
    files = [InputFile(f"s3://b/{name}", name, len(keys)) for name, keys in sizes_and_keys.items()]
    return plan_grouped(files, lambda f: sizes_and_keys[f.relpath], rows_per_shard), files


def test_rows_sharing_a_key_land_in_shards_of_their_own():
    keys = shuffled_keys(300, 3)
    shards, _ = grouped({"a.parquet": keys}, 40)
    assert [s.index for s in shards] == list(range(len(shards)))
    for s in shards:
        assert {keys[i] for i in s.row_indices()} == {s.group}  # one key per shard, and it is the shard's group
        assert s.num_rows <= 40 and list(s.row_indices()) == sorted(s.row_indices())
    # Every row exactly once; each key's 100 rows cut as evenly as they go: 34 + 33 + 33.
    assert sorted(i for s in shards for i in s.row_indices()) == list(range(300))
    assert sorted(s.num_rows for s in shards) == [33, 33, 33, 33, 33, 33, 34, 34, 34]
    # Ordered by key: a key's shards are neighbours in the plan (the scheduler sees them together).
    assert [s.group for s in shards] == sorted(s.group for s in shards)


def test_shards_never_span_files_and_files_go_in_relpath_order():
    shards, files = grouped({"b.parquet": shuffled_keys(50, 2, 1), "a.parquet": shuffled_keys(50, 2, 2)}, 100)
    assert [s.relpath for s in shards] == ["a.parquet"] * 2 + ["b.parquet"] * 2
    for f in files:
        assert sorted(i for s in shards if s.relpath == f.relpath for i in s.row_indices()) == list(range(50))


def test_rare_and_missing_keys_are_cut_in_file_order_as_ranges_where_they_are_contiguous():
    # Rows 0-19 share a key; rows 20-29 have none (short prompts); rows 30-33 share a key too few rows share.
    keys = [7] * 20 + [None] * 10 + [9] * (MIN_GROUP_ROWS - 4) + [None] * 2
    shards, _ = grouped({"a.parquet": keys}, 8)
    assert [(s.group, s.start, s.stop, s.rows) for s in shards] == [
        (7, 0, 6, None), (7, 6, 13, None), (7, 13, 20, None),  # contiguous: plain ranges, the key kept
        (None, 20, 28, None), (None, 28, 36, None),  # the rest, in file order, as plan() cuts a file
    ]  # fmt: skip


def test_a_plan_without_shared_prefixes_is_the_range_plan():
    files = [InputFile("s3://b/a.parquet", "a.parquet", 95)]
    distinct = plan_grouped(files, lambda f: list(range(f.num_rows)), 10)
    assert [(s.index, s.start, s.stop, s.rows, s.group) for s in distinct] == [
        (s.index, s.start, s.stop, None, None) for s in plan(files, 10)
    ]


def test_the_grouped_plan_is_deterministic_and_its_digest_names_it():
    keys = shuffled_keys(200, 4)
    first, _ = grouped({"a.parquet": keys}, 16)
    again, _ = grouped({"a.parquet": list(keys)}, 16)
    assert first == again and plan_digest(first) == plan_digest(again)
    swapped = list(keys)
    i, j = next((i, j) for i in range(200) for j in range(200) if keys[i] != keys[j])
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert plan_digest(grouped({"a.parquet": swapped}, 16)[0]) != plan_digest(first)


def test_keys_must_cover_every_row():
    with pytest.raises(ValueError, match="3 prefix keys for the 4 rows"):
        plan_grouped([InputFile("s3://b/a.parquet", "a.parquet", 4)], lambda f: [1, 1, 1], 4)


def test_a_listed_shard_reads_its_rows_and_names_them_by_their_index_in_the_file(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(100)]}), path, row_group_size=16)
    rows = (3, 17, 18, 50, 99)
    assert read_rows(str(path), {}, rows, ["prompt"]).column("prompt").to_pylist() == [f"p{i}" for i in rows]
    shard = Shard(4, str(path), "a.parquet", 3, 100, group=1, rows=rows)
    assert shard.num_rows == 5 and shard.describe_rows() == "5 rows within 3:100"
    # The ids a range plan gives these rows: a row's id is its index in its file, whatever its shard.
    assert row_ids(InputSpec(uri="x", prompt_column="prompt"), shard, pa.table({})) == [
        derived_id("a.parquet", i) for i in rows
    ]


def test_a_listed_shards_commit_record_says_which_rows_it_covers():
    shard = Shard(4, "s3://b/a.parquet", "a.parquet", 3, 100, group=1, rows=(3, 17, 99))
    record = CommitRecord(4, "part-00004", "x", "data/part-00004.parquet", None, None, Tally(rows_done=3),
                          input=shard.url, input_start=3, input_stop=100, input_row_count=3,
                          input_rows_digest=shard.rows_digest)  # fmt: skip
    again = CommitRecord.from_json(record.to_json())
    assert again == record and again.input_rows == 3 and again.covers(shard)
    assert not again.covers(Shard(4, shard.url, "a.parquet", 3, 100, group=1, rows=(3, 18, 99)))
    assert not again.covers(Shard(4, shard.url, "a.parquet", 3, 100))  # the whole range is other rows
    # A range shard's record is written as it always was.
    plain = CommitRecord(0, "part-00000", "x", "d", None, None, Tally(), input="u", input_start=0, input_stop=9)
    assert "input_row_count" not in plain.to_json() and plain.input_rows == 9


def test_prefix_keys_read_the_rendered_prompt_a_row_group_at_a_time(tmp_path):
    template = "You are a careful writer. " * 12  # longer than the key
    assert len(template) > PREFIX_CHARS
    prompts = [template + f"question {i}" if i % 3 else f"short {i}" for i in range(40)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": prompts, "topic": [f"t{i}" for i in range(40)]}), path, row_group_size=7)
    spec = InputSpec(uri=str(tmp_path), prompt_column="prompt")
    keys = prefix_keys(spec, InputFile(str(path), "a.parquet", 40))
    assert keys == [text_prefix_key(template) if i % 3 else None for i in range(40)]
    # A template renders first, then the key is read from what it rendered.
    templated = InputSpec(uri=str(tmp_path), prompt_template=template + "{topic}")
    assert set(prefix_keys(templated, InputFile(str(path), "a.parquet", 40))) == {text_prefix_key(template)}


def test_a_chats_key_text_is_its_messages_in_order_and_a_bad_row_has_none():
    spec = InputSpec(uri="x", messages_column="messages")
    system = {"role": "system", "content": "Be brief."}
    one = prompt_key_text(spec, {"messages": [system, {"role": "user", "content": "a"}]})
    two = prompt_key_text(spec, {"messages": [system, {"role": "user", "content": "b"}]})
    assert one.startswith("<system>\nBe brief.\n<user>\n") and one != two
    assert prompt_key_text(spec, {"messages": []}) is None
    assert prompt_key_text(InputSpec(uri="x", prompt_column="p"), {"p": None}) is None


def test_grouping_is_refused_for_openai_batch_files():
    data = job_dict("in.jsonl", "/out", "m", shards={"group_by_prefix": "on"})
    data["input"] = {"uri": "in.jsonl", "format": "openai-batch"}
    with pytest.raises(ValueError, match="group_by_prefix: on needs Parquet rows; input.format is openai-batch"):
        spec_from_dict(data)
    data = job_dict("/in", "/out", "m", shards={"group_by_prefix": "on"}, output={"format": "openai-batch"})
    with pytest.raises(ValueError, match="output.format is openai-batch"):
        spec_from_dict(data)
