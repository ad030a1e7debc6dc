"""Helpers for the Ray tests: read a job's output through fsspec and check it is exactly once."""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq

PART = re.compile(r"part-\d{5}\.parquet")


@dataclass
class Output:
    """Everything a job left under its output URI, read through fsspec."""

    files: list[str]  # every file, relative to the output root
    data: list[dict]  # rows of data/*.parquet
    errors: list[dict]  # rows of errors/*.parquet
    filtered: list[dict]  # rows of filtered/*.parquet
    metadata: dict[str, bytes]  # relpath -> schema metadata b"bulkgen" of each data/errors file
    record: dict | None  # _job.json
    manifest: dict | None  # _manifest.json
    fs: fsspec.AbstractFileSystem
    root: str

    def read_bytes(self, relpath: str) -> bytes:
        return self.fs.cat_file(posixpath.join(self.root, relpath))


def read_output(uri: str, storage_options: dict | None = None) -> Output:
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    fs.invalidate_cache()
    files = sorted(posixpath.relpath(p, root) for p in fs.find(root))
    rows, metadata = {"data": [], "errors": [], "filtered": []}, {}
    for rel in files:
        top = rel.split("/", 1)[0]
        if top not in rows:
            continue
        with fs.open(posixpath.join(root, rel), "rb") as f:
            table = pq.read_table(f)
        metadata[rel] = (table.schema.metadata or {}).get(b"bulkgen")
        rows[top].extend(table.to_pylist())

    def doc(name: str) -> dict | None:
        path = posixpath.join(root, name)
        return json.loads(fs.cat_file(path)) if fs.exists(path) else None

    return Output(
        files, rows["data"], rows["errors"], rows["filtered"], metadata, doc("_job.json"), doc("_manifest.json"), fs, root
    )


def assert_exactly_once(
    uri: str, storage_options: dict | None, expected_ids, n: int, id_column: str = "id", allow_errors: bool = False
) -> Output:
    """Every expected id has exactly samples 0..n-1, each once, across data/, errors/ and filtered/;
    nothing else is there."""
    out = read_output(uri, storage_options)
    for rel in out.files:
        top, _, name = rel.partition("/")
        if top in ("data", "errors", "filtered"):
            assert PART.fullmatch(name), f"unexpected file {rel!r} in the output"
    if not allow_errors:
        assert not out.fs.exists(posixpath.join(out.root, "errors")), f"errors/ should not exist: {out.files}"
    keys = Counter((r[id_column], r["sample_index"]) for r in out.data + out.errors + out.filtered)
    duplicated = {k: c for k, c in keys.items() if c > 1}
    assert not duplicated, f"rows written more than once: {sorted(duplicated.items())[:10]}"
    expected = {(i, s) for i in expected_ids for s in range(n)}
    missing, extra = expected - set(keys), set(keys) - expected
    assert not missing, f"{len(missing)} (id, sample_index) missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected (id, sample_index), e.g. {sorted(extra)[:5]}"
    return out


def assert_finished_layout(out: Output, shards: int, rows_total: int) -> None:
    """The committed layout of a succeeded job: record, manifest, marker, one file per shard, no staging."""
    for name in ("_SUCCESS", "_manifest.json", "_job.json"):
        assert name in out.files, f"{name} missing from {out.files}"
    assert not out.fs.exists(posixpath.join(out.root, "_staging")), f"_staging left behind: {out.files}"
    assert not [f for f in out.files if ".tmp" in f], f"temporary files left behind: {out.files}"
    data_files = sorted(f for f in out.files if f.startswith("data/"))
    assert data_files == [f"data/part-{i:05d}.parquet" for i in range(shards)]
    rec = out.record
    assert rec["state"] == "succeeded", rec.get("error")
    c = rec["counts"]
    assert c["rows_total"] == rows_total
    assert c["rows_done"] == rows_total == len(out.data)
    assert c["rows_failed"] == 0
    assert c["shards_committed"] == c["shards_total"] == shards
    assert c["prompt_tokens"] == sum(r["prompt_tokens"] for r in out.data)
    assert c["completion_tokens"] == sum(r["completion_tokens"] for r in out.data)
    assert out.manifest["fingerprint"] == rec["fingerprint"]
    assert [s["data"] for s in out.manifest["shards"]] == data_files
    assert sum(s["rows_done"] for s in out.manifest["shards"]) == rows_total
