"""The replica in-process (no Ray): a shard in, a staged output file out."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from jobs.core.plan import plan
from jobs.core.protocol import ShardTask, TaskKind, row_seed
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from tests.bad_files import corrupt_column, not_utf8
from tests.conftest import job_dict, write_prompts
from tests.workers.conftest import configured_replica, shard_result

pytestmark = pytest.mark.usefixtures("keep_torch_threads")

MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def make_spec(tmp_path: Path, model: Path, input_uri: str | None = None, **sections):
    sections.setdefault("generation", {})
    sections["generation"] = {"max_new_tokens": MAX_NEW, **sections["generation"]}
    data = job_dict(input_uri or str(tmp_path / "in"), str(tmp_path / "out"), model, **sections)
    return spec_from_dict(data)


def run_shards(spec, job_facts=None, attempt="attempt-0-test"):
    """Every shard of the input through one in-process replica; returns (results, staged tables)."""
    replica = configured_replica(spec, job_facts)
    shards = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)
    results = [shard_result(replica, ShardTask(shard, attempt)) for shard in shards]
    return shards, results


def read(url: str) -> pa.Table:
    return pq.read_table(url)


def input_rows(path) -> dict:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


# -- one shard, staged ------------------------------------------------------------------


def test_process_stages_one_row_per_id_and_sample(tmp_path, tiny_model, tokenizer):
    write_prompts(tmp_path / "in" / "prompts.parquet", 7)
    spec = make_spec(tmp_path, tiny_model, generation={"num_return_sequences": 2, "do_sample": True})
    [shard], [result] = run_shards(spec)

    staged = tmp_path / "out" / "_staging" / "part-00000" / "attempt-0-test" / "data.parquet"
    assert result.staged["data"] == str(staged)
    assert result.staged.get("errors") is None
    assert (result.shard, result.attempt, result.tally.rows_done, result.tally.rows_failed) == (0, "attempt-0-test", 14, 0)
    # Staged only: nothing is committed by the replica.
    assert not (tmp_path / "out" / "data").exists()

    table = read(result.staged["data"])
    assert table.column_names == [
        "id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens", "topic"
    ]
    assert table.schema.field("sample_index").type == pa.int32()
    rows = table.to_pylist()
    source = input_rows(tmp_path / "in" / "prompts.parquet")
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert sorted(keys) == sorted((i, s) for i in source for s in (0, 1))

    for r in rows:
        assert r["topic"] == source[r["id"]]["topic"]
        assert r["prompt_tokens"] == len(tokenizer(source[r["id"]]["prompt"]).input_ids)
        assert 0 <= r["completion_tokens"] <= MAX_NEW
        assert r["finish_reason"] in ("stop", "length")
        # No stop strings here: a row ends at eos ("stop") or at the budget ("length").
        assert (r["finish_reason"] == "length") == (r["completion_tokens"] == MAX_NEW)
    assert result.tally.prompt_tokens == sum(r["prompt_tokens"] for r in rows)
    assert result.tally.completion_tokens == sum(r["completion_tokens"] for r in rows)
    # Two samples of one row are two draws, not one text twice.
    texts = {}
    for r in rows:
        texts.setdefault(r["id"], []).append(r["text"])
    assert sum(a != b for a, b in texts.values()) >= 5


def test_greedy_output_is_what_the_engine_decodes(tmp_path, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    write_prompts(tmp_path / "in" / "prompts.parquet", 3)
    spec = make_spec(tmp_path, tiny_model)
    _, [result] = run_shards(spec)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    source = input_rows(tmp_path / "in" / "prompts.parquet")
    for r in read(result.staged["data"]).to_pylist():
        ids = tokenizer(source[r["id"]]["prompt"]).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
        new = out[0, len(ids) :].tolist()
        if 0 in new:
            new = new[: new.index(0)]
        assert r["text"] == tokenizer.decode(new, skip_special_tokens=True)
        assert r["completion_tokens"] == len(new)


def test_schema_metadata_carries_the_job_facts(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "prompts.parquet", 4)
    spec = make_spec(tmp_path, tiny_model)
    facts = {"fingerprint": spec.fingerprint(), "generation": spec.generation.model_dump(mode="json")}
    _, [result] = run_shards(spec, job_facts=facts)
    metadata = pq.read_schema(result.staged["data"]).metadata
    assert b"bulkgen" in metadata
    # The replica adds the engine that ran.
    import transformers

    assert json.loads(metadata[b"bulkgen"]) == {
        **facts,
        "engine": "transformers",
        "engine_version": transformers.__version__,
    }


def test_include_prompt_adds_the_rendered_prompt(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "prompts.parquet", 4)
    spec = make_spec(
        tmp_path,
        tiny_model,
        input={"prompt_column": None, "prompt_template": "A {style} note on {topic}", "pass_through": []},
        output={"include_prompt": True},
    )
    _, [result] = run_shards(spec)
    table = read(result.staged["data"])
    assert "prompt" in table.column_names and "topic" not in table.column_names
    source = input_rows(tmp_path / "in" / "prompts.parquet")
    for r in table.to_pylist():
        assert r["prompt"] == f"A {source[r['id']]['style']} note on {source[r['id']]['topic']}"


# -- row ranges and derived ids ------------------------------------------------------------------


def test_each_shard_reads_its_own_row_range_with_derived_ids(tmp_path, tiny_model, tokenizer):
    # Small row groups, so a shard starts and ends inside them.
    write_prompts(tmp_path / "in" / "prompts.parquet", 10, row_group_size=3)
    spec = make_spec(tmp_path, tiny_model, input={"id_column": None}, shards={"rows_per_shard": 4})
    shards, results = run_shards(spec)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    source = list(pq.read_table(tmp_path / "in" / "prompts.parquet").to_pylist())
    for shard, result in zip(shards, results):
        assert result.staged["data"].endswith(f"/_staging/{shard.name}/attempt-0-test/data.parquet")
        rows = read(result.staged["data"]).to_pylist()
        assert sorted(r["id"] for r in rows) == sorted(f"prompts.parquet:{i}" for i in range(shard.start, shard.stop))
        for r in rows:
            i = int(r["id"].split(":")[1])
            assert r["topic"] == source[i]["topic"]
            assert r["prompt_tokens"] == len(tokenizer(source[i]["prompt"]).input_ids)


def test_derived_ids_use_the_path_relative_to_the_input_root(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "day=1" / "a.parquet", 2)
    spec = make_spec(tmp_path, tiny_model, input={"id_column": None})
    _, [result] = run_shards(spec)
    assert sorted(read(result.staged["data"]).column("id").to_pylist()) == ["day=1/a.parquet:0", "day=1/a.parquet:1"]


# -- dead letters ---------------------------------------------------------------------------------


def test_bad_rows_become_typed_dead_letters(tmp_path, tiny_model):
    path = tmp_path / "in" / "prompts.parquet"
    path.parent.mkdir(parents=True)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 30  # over the 128-token context
    pq.write_table(
        pa.table(
            {
                "id": ["ok-1", "null", "blank", "long", "ok-2"],
                "prompt": ["Write a poem", None, "   ", long_prompt, "Raise ValueError"],
                "topic": ["a", "b", "c", "d", "e"],
            }
        ),
        path,
    )
    spec = make_spec(tmp_path, tiny_model, generation={"num_return_sequences": 2, "do_sample": True})
    _, [result] = run_shards(spec)
    assert (result.tally.rows_done, result.tally.rows_failed) == (4, 6)
    assert result.staged["errors"].endswith("/_staging/part-00000/attempt-0-test/errors.parquet")
    data = read(result.staged["data"]).to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in data) == [("ok-1", 0), ("ok-1", 1), ("ok-2", 0), ("ok-2", 1)]
    errors = read(result.staged["errors"])
    assert errors.column_names[:4] == ["id", "sample_index", "error_code", "error"]
    assert {"prompt", "topic"} <= set(errors.column_names)  # the input row, to inspect or retry
    by_key = {(r["id"], r["sample_index"]): r for r in errors.to_pylist()}
    assert sorted(by_key) == [(i, s) for i in ("blank", "long", "null") for s in (0, 1)]
    assert by_key[("null", 0)]["error_code"] == "empty_prompt" and "null" in by_key[("null", 0)]["error"]
    assert by_key[("blank", 1)]["error_code"] == "empty_prompt"
    assert by_key[("long", 0)]["error_code"] == "prompt_too_long" and "128" in by_key[("long", 0)]["error"]
    assert by_key[("long", 1)]["prompt"] == long_prompt and by_key[("long", 1)]["topic"] == "d"


def test_prompt_near_the_context_gets_only_the_room_left(tmp_path, tiny_model, tokenizer):
    # 124 prompt tokens in a 128-token context: at most 4 new tokens, whatever max_new_tokens says.
    words = ("The quick brown fox jumps over the lazy dog. " * 40).split(" ")
    prompt = next(
        " ".join(words[:k]) for k in range(len(words)) if len(tokenizer(" ".join(words[:k])).input_ids) >= 124
    )
    n = len(tokenizer(prompt).input_ids)
    assert 124 <= n < 128
    path = tmp_path / "in" / "p.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"], "prompt": [prompt], "topic": ["t"]}), path)
    spec = make_spec(tmp_path, tiny_model, generation={"max_new_tokens": 16})
    _, [result] = run_shards(spec)
    [row] = read(result.staged["data"]).to_pylist()
    assert row["prompt_tokens"] == n
    assert row["completion_tokens"] <= 128 - n


def test_per_row_max_new_tokens_column(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "p.parquet", 4, budget=pa.array([2, None, 5, 100], pa.int32()))
    spec = make_spec(tmp_path, tiny_model, input={"max_new_tokens_column": "budget"})
    _, [result] = run_shards(spec)
    got = {r["id"]: r for r in read(result.staged["data"]).to_pylist()}
    limits = {"row-00000": 2, "row-00001": MAX_NEW, "row-00002": 5, "row-00003": MAX_NEW}
    for key, limit in limits.items():
        assert got[key]["completion_tokens"] <= limit
        assert (got[key]["finish_reason"] == "length") == (got[key]["completion_tokens"] == limit)


# -- output columns do not collide --------------------------------------------------------------------


@pytest.mark.parametrize(
    "id_column, pass_through",
    [(None, ["id", "topic"]), ("id", ["id", "topic"]), ("text", ["topic"])],
    ids=["derived-id-and-input-id", "id-column-passed-through", "id-column-named-text"],
)
def test_output_column_names_are_unique(tmp_path, tiny_model, id_column, pass_through):
    write_prompts(tmp_path / "in" / "p.parquet", 3, text=["t-0", "t-1", "t-2"])
    try:
        spec = make_spec(tmp_path, tiny_model, input={"id_column": id_column, "pass_through": pass_through})
    except ValueError:
        return  # refusing the spec is a fix too
    _, [result] = run_shards(spec)
    names = pq.read_schema(result.staged["data"]).names
    assert len(names) == len(set(names)), names
    assert read(result.staged["data"]).num_rows == 3


# -- seeds --------------------------------------------------------------------------------------


def test_row_seed_is_a_function_of_seed_id_and_sample_index():
    base = row_seed(0, "row-1", 0)
    assert row_seed(0, "row-1", 0) == base
    assert row_seed(1, "row-1", 0) != base
    assert row_seed(0, "row-2", 0) != base
    assert row_seed(0, "row-1", 1) != base
    seeds = {row_seed(s, f"r{i}", k) for s in range(3) for i in range(50) for k in range(3)}
    assert len(seeds) == 450
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: a change here changes every sampled text of every job, and a resumed
    # job would mix texts drawn under two seed schemes.
    assert row_seed(0, "row-1", 0) == 7580321426454909084
    assert row_seed(42, "a", 3) == 7466740623622855618


def test_sampled_text_depends_on_the_row_not_on_its_shard_or_batch(tmp_path, tiny_model):
    gen = {"num_return_sequences": 2, "do_sample": True, "seed": 11, "temperature": 1.0}
    write_prompts(tmp_path / "a" / "in" / "p.parquet", 9)
    # The same rows, in another order, in another layout, decoded in other batches.
    table = pq.read_table(tmp_path / "a" / "in" / "p.parquet")
    (tmp_path / "b" / "in").mkdir(parents=True)
    pq.write_table(table.take(list(range(8, -1, -1))), tmp_path / "b" / "in" / "p.parquet")

    def texts(root, rows_per_shard, batch_size, seed=11):
        spec = make_spec(
            root, tiny_model, generation={**gen, "seed": seed},
            shards={"rows_per_shard": rows_per_shard}, resources={"batch_size": batch_size},
        )
        _, results = run_shards(spec)
        return {(r["id"], r["sample_index"]): r["text"] for res in results for r in read(res.staged["data"]).to_pylist()}

    first = texts(tmp_path / "a", 9, 8)
    assert len(first) == 18
    assert texts(tmp_path / "b", 2, 3) == first
    other_seed = texts(tmp_path / "a", 9, 8, seed=12)
    assert sum(other_seed[k] != first[k] for k in first) >= 9


# -- shards in flight together ----------------------------------------------------------------------


def test_two_shards_in_flight_at_once_give_the_same_files(tmp_path, tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    write_prompts(tmp_path / "in" / "p.parquet", 12)
    spec = make_spec(
        tmp_path, tiny_model, generation={"do_sample": True, "seed": 3}, shards={"rows_per_shard": 4},
        resources={"batch_size": 4},
    )
    replica = configured_replica(spec)
    shards = plan(open_dataset(spec.input).files, 4)
    one_by_one = [read(shard_result(replica, ShardTask(s, "attempt-0-seq")).staged["data"]) for s in shards]
    # A threaded actor runs up to two shards at once; their sequences share the engine's batch.
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda s: shard_result(replica, ShardTask(s, "attempt-0-par")), shards))
    for shard, result, expected in zip(shards, together, one_by_one):
        assert result.shard == shard.index
        assert read(result.staged["data"]).equals(expected)


# -- retrying a committed shard's dead letters ------------------------------------------------------------


def test_retry_failed_regenerates_dead_letters_and_keeps_the_rest(tmp_path, tiny_model):
    path = tmp_path / "in" / "p.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": ["a", "b", "c", "d"], "prompt": ["Write a poem", None, "Raise it", "The quick fox"],
                  "topic": ["ta", "tb", "tc", "td"]}),
        path,
    )
    spec = make_spec(tmp_path, tiny_model)
    replica = configured_replica(spec)
    [shard] = plan(open_dataset(spec.input).files, 10)
    first = shard_result(replica, ShardTask(shard, "attempt-0-a"))
    data, errors = read(first.staged["data"]), read(first.staged["errors"])
    assert sorted(data.column("id").to_pylist()) == ["a", "c", "d"]
    # Commit it as if row "c" had failed for a passing reason (say, out of memory at the time).
    out = tmp_path / "out"
    (out / "data").mkdir()
    (out / "errors").mkdir()
    keep = pc.not_equal(data.column("id"), "c")
    pq.write_table(data.filter(keep), out / "data" / f"{shard.name}.parquet")
    c_row = {"id": "c", "sample_index": 0, "error_code": "generation_error", "error": "out of memory",
             "prompt": "Raise it", "topic": "tc"}
    failed = pa.concat_tables([errors, pa.Table.from_pylist([c_row], schema=errors.schema)])
    pq.write_table(failed, out / "errors" / f"{shard.name}.parquet")

    again = shard_result(replica, ShardTask(shard, "attempt-1-b", TaskKind.RETRY_FAILED))
    regenerated = read(again.staged["data"])
    assert sorted(regenerated.column("id").to_pylist()) == ["a", "c", "d"]
    assert regenerated.sort_by("id").equals(data.sort_by("id"))  # the same text: same seed, same row
    still = read(again.staged["errors"]).to_pylist()
    assert [(r["id"], r["sample_index"], r["error_code"]) for r in still] == [("b", 0, "empty_prompt")]
    assert (again.tally.rows_done, again.tally.rows_failed) == (3, 1)


def test_dead_letters_keep_the_reference_and_retry_scores_them(tmp_path, tiny_model):
    path = tmp_path / "in" / "p.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": ["a", "b"], "prompt": ["Write a poem", None], "topic": ["ta", "tb"],
                  "ref": ["a poem", "a note"]}),
        path,
    )  # fmt: skip
    spec = make_spec(tmp_path, tiny_model, evaluation={"reference_column": "ref"})
    replica = configured_replica(spec)
    [shard] = plan(open_dataset(spec.input).files, 10)
    first = shard_result(replica, ShardTask(shard, "attempt-0-a"))
    errors = read(first.staged["errors"])
    assert errors.column("ref").to_pylist() == ["a note"]  # all a retry needs, the reference included
    out = tmp_path / "out"
    (out / "data").mkdir()
    (out / "errors").mkdir()
    pq.write_table(read(first.staged["data"]), out / "data" / f"{shard.name}.parquet")
    b_row = {**errors.to_pylist()[0], "prompt": "Write a note"}  # fixed at the source, say
    pq.write_table(pa.Table.from_pylist([b_row], schema=errors.schema), out / "errors" / f"{shard.name}.parquet")

    again = read(shard_result(replica, ShardTask(shard, "attempt-1-b", TaskKind.RETRY_FAILED)).staged["data"])
    scored = {r["id"]: r for r in again.to_pylist()}
    assert sorted(scored) == ["a", "b"] and scored["b"]["ref"] == "a note"
    assert scored["b"]["bleu"] is not None


# -- input that pyarrow reads but cannot hand over -------------------------------------------


def test_a_string_not_utf8_is_one_bad_encoding_dead_letter(tmp_path, tiny_model):
    path = tmp_path / "in" / "prompts.parquet"
    path.parent.mkdir(parents=True)
    prompts = [f"Write note {i}".encode() for i in range(6)]
    prompts[2] = b"Write \xff\xfe note"
    topics = [b"t"] * 6
    topics[4] = b"caf\xe9"  # Latin-1, not UTF-8: a carried column fails its row too
    ids = [f"r{i}" for i in range(6)]
    pq.write_table(pa.table({"id": ids, "prompt": not_utf8(prompts), "topic": not_utf8(topics)}), path)
    spec = make_spec(tmp_path, tiny_model)
    _, [result] = run_shards(spec)

    assert (result.tally.rows_done, result.tally.rows_failed) == (4, 2)
    assert sorted(r["id"] for r in read(result.staged["data"]).to_pylist()) == ["r0", "r1", "r3", "r5"]
    errors = {r["id"]: r for r in read(result.staged["errors"]).to_pylist()}
    assert sorted(errors) == ["r2", "r4"]
    assert {r["error_code"] for r in errors.values()} == {"bad_encoding"}
    assert "column 'prompt'" in errors["r2"]["error"] and "\\xff\\xfe" in errors["r2"]["error"]
    assert "column 'topic'" in errors["r4"]["error"]
    # The dead letter keeps what did decode, so the row can be found and fixed.
    assert (errors["r2"]["prompt"], errors["r2"]["topic"]) == (None, "t")
    assert (errors["r4"]["prompt"], errors["r4"]["topic"]) == ("Write note 4", None)


def test_a_corrupt_page_names_its_file(tmp_path, tiny_model):
    from jobs.core.errors import InputError

    path = write_prompts(tmp_path / "in" / "prompts.parquet", 6)
    corrupt_column(path, "prompt")
    spec = make_spec(tmp_path, tiny_model)
    with pytest.raises(InputError, match=r"cannot read rows 0:6 of input file .*prompts\.parquet"):
        run_shards(spec)



def test_a_checkpoint_missing_weights_is_refused_as_bad_input(tmp_path, tiny_model, keep_torch_threads):
    """On a local Ray the replica's load is the model's check (the driver builds no meta model):
    a weight the architecture needs and the checkpoint lacks is the job's bad input, named with
    its checkpoint, raised by configure so that the driver gets it as itself (exit 2)."""
    from jobs.core.errors import ModelError
    from tests.tiny_model import save_without_weight
    from workers.replica import Replica

    missing = "model.layers.0.self_attn.o_proj.weight"
    model = save_without_weight(tiny_model, tmp_path / "missing", missing)
    replica = Replica(spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model)))
    with pytest.raises(ModelError) as refused:
        replica.configure({})
    assert str(model) in str(refused.value) and missing in str(refused.value)
