"""The row cache across nights (cache.uri): night 2 generates only its new rows, and
writes the same output for the rows night 1 had; anything that decides the text misses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import job_dict, write_prompts
from tests.ray.conftest import assert_exactly_once

pytestmark = pytest.mark.ray


def night(tmp_path: Path, name: str, rows: int, model: Path, cache: Path, **generation):
    write_prompts(tmp_path / name / "in" / "p.parquet", rows)
    spec = job_dict(
        str(tmp_path / name / "in"), str(tmp_path / name / "out"), model,
        generation={"max_new_tokens": 6, "do_sample": True, "temperature": 0.9, "seed": 5, **generation},
        resources={"replicas": 1}, shards={"rows_per_shard": 250},
    )  # fmt: skip
    spec["cache"] = {"uri": str(cache)}
    record = run_job(spec_from_dict(spec), progress=False)
    assert_exactly_once(str(tmp_path / name / "out"), {}, [f"row-{i:05d}" for i in range(rows)], n=1)
    return record, {r["id"]: r for r in ds.dataset(str(tmp_path / name / "out" / "data")).to_table().to_pylist()}


def generated_by_engines(record) -> int:
    """Tokens the replicas' engines generated, from their own counters."""
    return sum(replica["generated_tokens"] for replica in record.run.replicas.values())


def test_night_two_generates_only_its_new_rows(ray_cluster, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    first, night1 = night(tmp_path, "night1", 1000, tiny_model, cache)
    assert first.counts.rows_cached == 0
    assert len(list(cache.rglob("*.json"))) == 1000  # every committed row entered the cache
    assert generated_by_engines(first) == sum(r["completion_tokens"] for r in night1.values())

    second, night2 = night(tmp_path, "night2", 1100, tiny_model, cache)
    assert second.counts.rows_cached == 1000
    new = [r for key, r in night2.items() if key not in night1]
    assert len(new) == 100
    assert generated_by_engines(second) == sum(r["completion_tokens"] for r in new)  # only the new rows
    fields = ("text", "finish_reason", "completion_tokens", "prompt_tokens")
    assert all(tuple(night2[k][f] for f in fields) == tuple(r[f] for f in fields) for k, r in night1.items())
    assert len(list(cache.rglob("*.json"))) == 1100


@pytest.mark.parametrize("change", [{"seed": 6}, {"temperature": 0.8}, {"top_p": 0.9}])
def test_what_decides_the_text_makes_every_row_miss(ray_cluster, tiny_model, tmp_path, change):
    cache = tmp_path / "cache"
    night(tmp_path, "before", 40, tiny_model, cache)
    again, _ = night(tmp_path, "same", 40, tiny_model, cache)
    assert again.counts.rows_cached == 40  # the control: nothing changed, every row hits
    changed, _ = night(tmp_path, "changed", 40, tiny_model, cache, **change)
    assert changed.counts.rows_cached == 0


def test_other_weights_make_every_row_miss(ray_cluster, tiny_model, tmp_path):
    from tests.tiny_model import save_tiny_model

    cache = tmp_path / "cache"
    night(tmp_path, "before", 40, tiny_model, cache)
    retrained = save_tiny_model(tmp_path / "retrained", arch="llama", seed=1)
    changed, _ = night(tmp_path, "changed", 40, retrained, cache)
    assert changed.counts.rows_cached == 0


def test_a_changed_checkpoint_config_makes_every_row_miss(ray_cluster, tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")  # the same path and weights both nights
    cache = tmp_path / "cache"
    night(tmp_path, "before", 40, model, cache)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500.0
    (model / "config.json").write_text(json.dumps(config))
    changed, _ = night(tmp_path, "changed", 40, model, cache)
    assert changed.counts.rows_cached == 0
