"""Whole jobs with LoRA adapters through Ray, on either engine: one replica serves two adapters
and the base model, chosen per row; an adapter's hash is in the record, every file's metadata,
the fingerprint and the row cache's keys, so retraining one regenerates only its rows, and
resuming the job after the change is refused."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from jobs.cli import main
from jobs.core import adapters
from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import ADAPTER_TEXTS, job_dict, write_job, write_prompts
from tests.ray.conftest import assert_exactly_once, read_output
from tests.tiny_model import train_lora

pytestmark = pytest.mark.ray

ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]
NAMES = ["poem", "code", None, "poem", "code", None]  # each row's adapter column
IDS = [f"row-{i:05d}" for i in range(len(NAMES))]


def job(tmp_path, model, engine: str, output: str, adapter_paths: dict | None, cache=None) -> dict:
    """The job over NAMES' rows, greedy; with `adapter_paths` ({name: path}) the rows choose among them."""
    data = job_dict(str(tmp_path / "in"), str(tmp_path / output), model, shards={"rows_per_shard": 3})
    data["model"]["engine"] = engine
    if engine == "vllm":
        data["model"]["engine_options"] = {"enforce_eager": True}  # seconds to start, not a compile
    if adapter_paths is not None:
        data["model"]["adapters"] = {name: str(path) for name, path in adapter_paths.items()}
        data["input"]["adapter_column"] = "adapter"
    if cache is not None:
        data["cache"] = {"uri": str(cache)}
    return data


def texts(output) -> dict:
    return {row["id"]: row["text"] for row in output.data}


@pytest.mark.parametrize("engine", ENGINES)
def test_adapters_change_their_rows_only_and_their_hashes_decide_the_cache(ray_cluster, tiny_model, lora_adapters, tmp_path,
                                                                          capsys, engine):  # fmt: skip
    write_prompts(tmp_path / "in" / "p.parquet", len(NAMES), adapter=NAMES)
    paths = {"poem": lora_adapters["poem"], "code": train_lora(tiny_model, tmp_path / "code", ADAPTER_TEXTS["code"], seed=1)}
    cache = tmp_path / "cache"

    plain = run_job(spec_from_dict(job(tmp_path, tiny_model, engine, "plain", None)), progress=False)
    first_spec = spec_from_dict(job(tmp_path, tiny_model, engine, "first", paths, cache))
    first = run_job(first_spec, progress=False)
    assert plain.state == first.state == "succeeded" and first.model["replica"]["engine"] == engine
    assert_exactly_once(str(tmp_path / "first"), {}, IDS, n=1)

    base, adapted = read_output(str(tmp_path / "plain")), read_output(str(tmp_path / "first"))
    for row_id, name in zip(IDS, NAMES):
        same = texts(adapted)[row_id] == texts(base)[row_id]
        assert same == (name is None), f"{row_id} ({name}): only the rows naming an adapter change"
    assert {r["id"]: r["adapter"] for r in adapted.data} == dict(zip(IDS, NAMES))
    assert len(first.run.replicas) == 1  # one replica served both adapters
    hashes = {name: adapters.files_sha256(path) for name, path in paths.items()}
    assert {name: a["sha256"] for name, a in first.model["adapters"].items()} == hashes
    for metadata in adapted.metadata.values():
        assert {name: a["sha256"] for name, a in json.loads(metadata)["model"]["adapters"].items()} == hashes

    # Retrain `code` in place: a new job misses its rows only; the fingerprint changes.
    train_lora(tiny_model, paths["code"], ADAPTER_TEXTS["code"], seed=2)
    second_spec = spec_from_dict(job(tmp_path, tiny_model, engine, "second", paths, cache))
    second = run_job(second_spec, progress=False)
    assert second.counts.rows_cached == NAMES.count("poem") + NAMES.count(None)
    assert second_spec.fingerprint() != first_spec.fingerprint()
    again = read_output(str(tmp_path / "second"))
    assert {k: v for k, v in texts(again).items() if k not in IDS[1::3]} == {
        k: v for k, v in texts(adapted).items() if k not in IDS[1::3]
    }

    # The first output's job ran the adapter as it was: resuming it, or running the spec into it, is refused.
    assert main(["resume", str(tmp_path / "first"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.adapters.code" in err and "the adapter changed" in err, err
    spec_file = write_job(tmp_path / "job.yaml", job(tmp_path, tiny_model, engine, "first", paths, cache))
    assert main(["run", str(spec_file), "--no-progress"]) == 2
    assert "committed shards of a different job spec" in capsys.readouterr().err
