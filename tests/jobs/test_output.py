"""The commit protocol: only committed shards count, a zombie attempt cannot publish,
and a crash in the middle of a commit leaves the shard uncommitted, never half-replaced."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

import jobs.output
from jobs.core.plan import Shard
from jobs.core.protocol import ShardResult, Tally
from jobs.core.storage import move, write_parquet
from jobs.output import OutputDir


def stage(out_uri: str, shard: int, attempt: str, ids: list[str], errors: list[str] = ()) -> ShardResult:
    base = f"{out_uri}/_staging/part-{shard:05d}/{attempt}"
    write_parquet(pa.table({"id": ids, "sample_index": [0] * len(ids)}), f"{base}/data.parquet", {})
    if errors:
        write_parquet(pa.table({"id": list(errors), "sample_index": [0] * len(errors)}), f"{base}/errors.parquet", {})
    return ShardResult(
        shard=shard,
        attempt=attempt,
        tally=Tally(rows_done=len(ids), rows_failed=len(errors)),
        seconds=0.0,
        staged={"data": f"{base}/data.parquet", **({"errors": f"{base}/errors.parquet"} if errors else {})},
    )


def shard(index: int) -> Shard:
    return Shard(index, "file:///in/a.parquet", "a.parquet", 0, 2)


def published(out_uri: str, kind: str) -> list[str]:
    dataset = ds.dataset(f"{out_uri}/{kind}", format="parquet") if os.path.isdir(f"{out_uri}/{kind}") else None
    if dataset is None or not dataset.files:
        return []
    return sorted(dataset.to_table().column("id").to_pylist())


def test_commit_publishes_files_then_its_record(tmp_path):
    out = OutputDir(str(tmp_path), {})
    record = out.commit(stage(str(tmp_path), 3, "attempt-0-a", ["a", "b"], errors=["c"]), shard(3), 1)
    assert record.tally.rows_done == 2 and record.tally.rows_failed == 1
    assert published(str(tmp_path), "data") == ["a", "b"]
    assert published(str(tmp_path), "errors") == ["c"]
    assert set(out.commit_records()) == {3}
    assert not (tmp_path / "_staging" / "part-00003").exists()


def test_a_zombie_attempt_never_reaches_data(tmp_path):
    out = OutputDir(str(tmp_path), {})
    out.commit(stage(str(tmp_path), 0, "attempt-1-live", ["a", "b"]), shard(0), 1)
    # The attempt the driver gave up on finishes afterwards and stages its files.
    stage(str(tmp_path), 0, "attempt-0-zombie", ["a", "b"])
    assert published(str(tmp_path), "data") == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-00000.parquet"]


def test_a_redo_without_errors_removes_the_stale_errors_file(tmp_path):
    out = OutputDir(str(tmp_path), {})
    # An earlier attempt got as far as publishing its errors file, then the driver died.
    first = stage(str(tmp_path), 0, "attempt-0-x", ["a"], errors=["b"])
    move(first.staged["errors"], str(tmp_path / "errors" / "part-00000.parquet"), {})
    assert out.commit_records() == {}  # no record: not committed
    out.commit(stage(str(tmp_path), 0, "attempt-1-y", ["a", "b"]), shard(0), 2)
    assert published(str(tmp_path), "data") == ["a", "b"]
    assert published(str(tmp_path), "errors") == []


def test_a_crash_while_replacing_a_committed_shard_uncommits_it(tmp_path, monkeypatch):
    out = OutputDir(str(tmp_path), {})
    out.commit(stage(str(tmp_path), 0, "attempt-0-a", ["a"], errors=["b"]), shard(0), 1)
    # retry-failed replaces the shard: "b" now succeeds. The storage dies after the first move.
    retry = stage(str(tmp_path), 0, "attempt-1-b", ["a", "b"])
    moves = []

    def dying_move(src, dst, storage_options):
        moves.append(dst)
        raise PermissionError("storage went away")  # permanent: no retry

    monkeypatch.setattr(jobs.output, "move", dying_move)  # the commit's one way to publish a file
    with pytest.raises(PermissionError):
        out.commit(retry, shard(0), 1)
    # The old pair is no longer counted as committed, so a resume redoes the shard
    # whole instead of trusting a half-replaced pair.
    assert out.commit_records() == {}
    assert moves
