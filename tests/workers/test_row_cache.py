"""The replica's side of the row cache in-process (no Ray): what it takes from the cache,
and what it refuses to take."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from jobs.core.plan import plan
from jobs.core.protocol import ShardTask
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from tests.conftest import job_dict, write_prompts
from tests.workers.conftest import configured_replica, shard_result

pytestmark = pytest.mark.usefixtures("keep_torch_threads")

MAX_NEW = 8
ROWS = 12


def cached_spec(tmp_path, model, **generation):
    data = job_dict(
        str(tmp_path / "in"), str(tmp_path / "out"), model,
        generation={"max_new_tokens": MAX_NEW, "do_sample": True, "temperature": 0.9, "seed": 5, **generation},
        shards={"rows_per_shard": 100},
    )  # fmt: skip
    data["cache"] = {"uri": str(tmp_path / "cache")}
    return spec_from_dict(data)


def run_once(spec, attempt: str):
    """The one shard through a fresh replica, its rows committed to the cache; (result, rows by id)."""
    replica = configured_replica(spec)
    [shard] = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)
    result = shard_result(replica, ShardTask(shard, attempt))
    replica.publish_cache(attempt)
    return result, {r["id"]: r for r in pq.read_table(result.staged["data"]).to_pylist()}


BAD_ENTRIES = [
    '{"text": null, "finish_reason": "stop", "completion_tokens": 1}',
    '{"text": "banana", "finish_reason": "banana", "completion_tokens": 1}',
    '{"text": "cut", "finish_reason": "st',
    '{"text": "minus", "finish_reason": "stop", "completion_tokens": -1}',
    '{"text": "too long", "finish_reason": "length", "completion_tokens": %d}' % (MAX_NEW + 1),
    '{"text": "a string count", "finish_reason": "stop", "completion_tokens": "1"}',
]


def test_an_entry_not_of_the_row_schema_is_a_counted_miss(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    spec = cached_spec(tmp_path, tiny_model)
    _, fresh = run_once(spec, "attempt-0")
    entries = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(entries) == ROWS
    for path, bad in zip(entries, BAD_ENTRIES):
        path.write_text(bad)

    result, again = run_once(spec, "attempt-1")
    assert result.tally.rows_cached == ROWS - len(BAD_ENTRIES)
    assert result.replica["cache_entries_rejected"] == len(BAD_ENTRIES)
    fields = ("text", "finish_reason", "completion_tokens")
    assert {k: tuple(r[f] for f in fields) for k, r in again.items()} == {
        k: tuple(r[f] for f in fields) for k, r in fresh.items()
    }
    # The regenerated rows were written back once committed: a third run takes every row.
    result, _ = run_once(spec, "attempt-2")
    assert (result.tally.rows_cached, result.replica["cache_entries_rejected"]) == (ROWS, 0)


@pytest.mark.parametrize(
    "name, change",
    [
        ("config.json", lambda c: c["rope_parameters"].update(rope_theta=500.0)),
        ("generation_config.json", lambda c: c.update(top_k=5)),  # the checkpoint's own defaults
    ],
)
def test_a_changed_checkpoint_config_misses(tmp_path, tiny_model, name, change):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    spec = cached_spec(tmp_path, model)
    run_once(spec, "attempt-0")
    result, _ = run_once(spec, "attempt-1")
    assert result.tally.rows_cached == ROWS  # the control: nothing changed, every row hits

    config = json.loads((model / name).read_text())
    change(config)
    (model / name).write_text(json.dumps(config))
    result, _ = run_once(spec, "attempt-2")
    assert result.tally.rows_cached == 0


def test_logprobs_come_from_the_cache_for_the_same_ask_only(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "p.parquet", ROWS)
    run_once(cached_spec(tmp_path, tiny_model), "attempt-0")
    top3 = cached_spec(tmp_path, tiny_model, logprobs=True, top_logprobs=3)
    result, fresh = run_once(top3, "attempt-1")
    assert result.tally.rows_cached == 0  # the plain job's entries are under other keys: they hold no logprobs
    result, again = run_once(top3, "attempt-2")
    assert result.tally.rows_cached == ROWS
    assert again == fresh  # every column, the logprobs' among them
    assert all(len(r["top_logprobs"]) == r["completion_tokens"] for r in again.values())
    result, _ = run_once(cached_spec(tmp_path, tiny_model, logprobs=True, top_logprobs=2), "attempt-3")
    assert result.tally.rows_cached == 0  # another K, another key
def test_an_adapters_hash_is_in_its_rows_keys(tmp_path, tiny_model):
    from workers.engine import Request
    from workers.row_cache import ReplicaCache

    def keys(adapters: dict | None) -> dict:
        data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
        data["cache"] = {"uri": str(tmp_path / "cache")}
        if adapters is not None:
            data["model"]["adapters"] = {name: str(path) for name, path in adapters.items()}
            data["input"]["adapter_column"] = "adapter"
        cache = ReplicaCache(spec_from_dict(data), {}, {"engine": "transformers"})
        names = [None, *sorted(adapters or {})]
        return cache.keys([Request(i, (1, 2, 3), 0, MAX_NEW, adapter=name) for i, name in enumerate(names)], 100)

    for name in ("poem", "code"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "name": name}))
    adapters = {"poem": tmp_path / "poem", "code": tmp_path / "code"}
    plain, before = keys(None), keys(adapters)
    assert len(set(before.values())) == 3  # base, code, poem: each its own
    assert before[0] != plain[0]  # an adapter job's base rows share no entry with a plain job's
    (tmp_path / "code" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "name": "retrained"}))
    after = keys(adapters)
    assert (after[0], after[2]) == (before[0], before[2]) and after[1] != before[1]  # only code's rows miss


def test_a_constraint_keys_its_sequences_apart(tmp_path, tiny_model):
    from dataclasses import replace

    from jobs.core.structured import Structured
    from workers.engine import Request
    from workers.row_cache import ReplicaCache

    def key(request, **generation):
        data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model, generation=generation,
                        cache={"uri": str(tmp_path / "cache")})  # fmt: skip
        return ReplicaCache(spec_from_dict(data), {}, {"engine": "transformers"}).keys([request], 1)[0]

    plain = Request(0, (5, 6, 7), seed=3, max_new_tokens=8)
    regex = replace(plain, structured=Structured("regex", "[a-z]+"))
    compact = {"structured": {"regex": "[a-z]+"}}
    # An unconstrained sequence is the same sequence in a job that may constrain others.
    assert key(plain, **compact) == key(plain)
    assert len({key(regex, **compact), key(plain), key(replace(regex, structured=Structured("regex", "[a-z]*")), **compact),
                key(regex, structured={"regex": "[a-z]+", "whitespace": "flexible"})}) == 4  # fmt: skip
