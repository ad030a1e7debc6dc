"""The row cache's store (workers/row_cache_store.py): entries on local disk and S3."""

from __future__ import annotations

import pytest

from jobs.core.cache import Entry
from workers.row_cache_store import RowCache


def check_round_trip(cache: RowCache) -> None:
    a, b, missing = "a1" * 32, "b2" * 32, "c3" * 32
    assert cache.get_many([a, b]) == {}
    cache.put_many({a: Entry("hello", "length", 3), b: Entry("bye", "stop", 1)})
    assert cache.get_many([a, b, missing]) == {a: Entry("hello", "length", 3), b: Entry("bye", "stop", 1)}
    assert cache.url(a).endswith(f"/v1/a1/{a}.json")  # the documented layout


def test_entries_on_local_disk(tmp_path):
    cache = RowCache(str(tmp_path / "cache"), {})
    check_round_trip(cache)
    stray = "d4" * 32
    path = tmp_path / "cache" / "v1" / "d4" / f"{stray}.json"
    path.parent.mkdir(parents=True)
    path.write_text("not an entry")
    assert cache.get_many([stray]) == {}  # a miss, not an error
    path.write_text('{"text": null, "finish_reason": "stop", "completion_tokens": 1}')
    assert cache.get_many([stray]) == {}


@pytest.mark.s3
def test_entries_on_s3(s3):
    check_round_trip(RowCache(f"s3://{s3['bucket']}/cache", s3["options"]))
