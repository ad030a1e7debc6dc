"""The typed tally, shard result and commit record (jobs/core/protocol.py): on disk, a
commit record keeps the keys every release wrote."""

from __future__ import annotations

import json

from jobs.core.protocol import TALLY_FIELDS, CommitRecord, Tally

# A commit record as this release's driver wrote it (the demo job's first shard).
WRITTEN = json.loads("""{
  "attempt": "attempt-1-325d84a7",
  "attempts": 1,
  "committed_at": "2026-12-05T22:02:31.172+00:00",
  "completion_tokens": 966,
  "data": "data/part-00000.parquet",
  "errors": null,
  "filtered": null,
  "input": "file:///work/examples/demo/prompts.parquet",
  "input_start": 0,
  "input_stop": 50,
  "name": "part-00000",
  "prompt_tokens": 470,
  "replica_pid": 31436,
  "rows_cached": 0,
  "rows_done": 50,
  "rows_failed": 0,
  "rows_filtered": 0,
  "seconds": 2.165,
  "shard": 0
}""")

# The release before the row cache, filters and the report: fewer keys.
EARLIER = {
    "shard": 3, "name": "part-00003", "attempt": "attempt-0-ab", "data": "data/part-00003.parquet",
    "errors": "errors/part-00003.parquet", "rows_done": 8, "rows_failed": 2, "prompt_tokens": 80,
    "completion_tokens": 64, "input": "file:///in/a.parquet", "input_start": 30, "input_stop": 40, "attempts": 2,
}  # fmt: skip


def test_a_written_record_round_trips_key_for_key():
    record = CommitRecord.from_json(WRITTEN)
    assert record.tally == Tally(rows_done=50, prompt_tokens=470, completion_tokens=966)
    assert (record.shard, record.data, record.errors, record.replica_pid, record.input_rows) == (
        0, "data/part-00000.parquet", None, 31436, 50
    )  # fmt: skip
    assert record.to_json() == WRITTEN
    assert json.loads(json.dumps(record.to_json(), sort_keys=True)) == WRITTEN


def test_a_record_of_the_earlier_release_reads_with_defaults():
    record = CommitRecord.from_json(EARLIER)
    assert record.tally == Tally(rows_done=8, rows_failed=2, prompt_tokens=80, completion_tokens=64)
    assert (record.filtered, record.committed_at, record.seconds, record.replica_pid) == (None, None, None, None)
    assert (record.errors, record.input_rows, record.attempts) == ("errors/part-00003.parquet", 10, 2)
    # Written again (the manifest), it has today's keys, the earlier values kept.
    assert record.to_json() == {
        **EARLIER, "filtered": None, "rows_cached": 0, "rows_filtered": 0, "committed_at": None, "seconds": None,
        "replica_pid": None,
    }  # fmt: skip


def test_a_feature_counter_is_written_only_when_it_counted():
    thinking = CommitRecord.from_json({**WRITTEN, "reasoning_tokens": 120})
    assert thinking.tally.reasoning_tokens == 120
    assert thinking.to_json() == {**WRITTEN, "reasoning_tokens": 120}
    assert "reasoning_tokens" not in CommitRecord.from_json(WRITTEN).to_json()


def test_a_record_that_says_nothing_of_its_input_covers_no_rows():
    record = CommitRecord.from_json({"shard": 1, "data": "data/part-00001.parquet"})
    assert (record.name, record.input_rows, record.tally) == ("part-00001", 0, Tally())


def test_tallies_add_counter_by_counter():
    a = Tally(rows_done=3, rows_failed=1, rows_cached=2, prompt_tokens=30, completion_tokens=12)
    b = Tally(rows_done=1, rows_filtered=4, completion_tokens=5)
    assert a + b == Tally(rows_done=4, rows_failed=1, rows_cached=2, rows_filtered=4, prompt_tokens=30,
                          completion_tokens=17)  # fmt: skip
    assert sum((a, b), Tally()) == a + b
    assert list(Tally().to_json()) == list(TALLY_FIELDS)
    assert Tally.from_json({**a.to_json(), "shard": 0}) == a
