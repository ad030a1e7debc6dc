"""The same job with input and output on S3 (s3fs against loopback moto) and on memory://."""

from __future__ import annotations

import uuid

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from jobs.core.spec import spec_from_dict
from tests.conftest import job_dict, write_prompts
from tests.ray.conftest import assert_exactly_once, assert_finished_layout

pytestmark = pytest.mark.ray

SECRET = "SUPERSECRET-123"


@pytest.mark.s3
def test_job_on_s3_is_exactly_once_and_keeps_secrets(ray_cluster, tiny_model, s3, tmp_path):
    import s3fs

    # Ray workers were started before the fixture set AWS_* in this process, so the
    # credentials must travel in storage_options, as they would for a real cluster.
    options = {"key": "testing", "secret": SECRET, **s3["options"]}
    fs = s3fs.S3FileSystem(**options)
    bucket = s3["bucket"]
    # Locally written, then uploaded through s3fs: two files, one under a prefix.
    write_prompts(tmp_path / "a.parquet", 25, start=0)
    write_prompts(tmp_path / "b.parquet", 20, start=25)
    fs.put_file(str(tmp_path / "a.parquet"), f"{bucket}/prompts/a.parquet")
    fs.put_file(str(tmp_path / "b.parquet"), f"{bucket}/prompts/more/b.parquet")
    source = {r["id"]: r for p in ("a", "b") for r in pq.read_table(tmp_path / f"{p}.parquet").to_pylist()}

    output = f"s3://{bucket}/runs/job-1"
    spec = spec_from_dict(
        job_dict(
            f"s3://{bucket}/prompts",
            output,
            tiny_model,
            input={"storage_options": options, "pass_through": ["topic", "style"]},
            output={"storage_options": options},
            generation={"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 2},
            resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
        )
    )
    record = run_job(spec, progress=False)
    assert record.state == "succeeded"

    out = assert_exactly_once(output, options, list(source), n=2)
    assert_finished_layout(out, shards=5, rows_total=90)
    for row in out.data:
        assert (row["topic"], row["style"]) == (source[row["id"]]["topic"], source[row["id"]]["style"])
    # The record keeps which options were given, never their values.
    assert out.record["spec"]["input"]["storage_options"]["secret"] == "<redacted>"
    assert out.record["spec"]["output"]["storage_options"]["secret"] == "<redacted>"

    fs.invalidate_cache()
    written = [p for p in fs.find(bucket) if not p.startswith(f"{bucket}/prompts/")]
    assert len(written) == len(out.files) > 0
    leaks = [p for p in written if SECRET.encode() in fs.cat_file(p)]
    assert not leaks, f"the secret storage option was written to {leaks}"


def test_job_on_memory_filesystem(ray_cluster, tiny_model):
    root = f"memory://bulkgen-test-{uuid.uuid4().hex[:8]}"
    try:
        write_prompts(f"{root}/in/a.parquet", 25, start=0)
        write_prompts(f"{root}/in/sub/b.parquet", 20, start=25)
        fs = fsspec.filesystem("memory")
        source = {}
        for rel in ("a.parquet", "sub/b.parquet"):
            with fs.open(f"{root}/in/{rel}", "rb") as f:
                for i, row in enumerate(pq.read_table(f).to_pylist()):
                    source[f"{rel}:{i}"] = row
        spec = spec_from_dict(
            job_dict(
                f"{root}/in",
                f"{root}/out",
                tiny_model,
                input={"id_column": None, "pass_through": ["topic"]},
                generation={"max_new_tokens": 6},
                output={"include_prompt": True},
                resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
            )
        )
        record = run_job(spec, progress=False)
        assert record.state == "succeeded"
        out = assert_exactly_once(f"{root}/out", {}, list(source), n=1)
        assert_finished_layout(out, shards=5, rows_total=45)
        for row in out.data:
            assert row["prompt"] == source[row["id"]]["prompt"]
            assert row["topic"] == source[row["id"]]["topic"]
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
