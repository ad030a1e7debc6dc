"""The stages a replica chooses from its spec (workers/stages/), what each declares, and the
tally they count into the ShardResult. In-process, on the tiny model (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.core.plan import plan
from jobs.core.protocol import TALLY_FIELDS, ShardTask, TaskKind, Tally
from jobs.core.rows import data_fields, error_fields, filtered_fields
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from tests.conftest import job_dict, write_prompts
from tests.workers.conftest import configured_replica, shard_result
from workers.engine_factory import create_engine
from workers.engine_loop import EngineLoop
from workers.stages import build_stages
from workers.stages.work import ShardWork

pytestmark = pytest.mark.usefixtures("keep_torch_threads")

ROWS = 6
CACHE = {"uri": "memory://stages-cache"}
FILTERS = {"min_completion_tokens": 4, "deduplicate": "exact"}  # exact: within a row, no Ray needed
EVALUATION = {"reference_column": "reference"}
REASONING = {"reasoning": {"start": "<think>", "end": "</think>"}}  # tags any tokenizer takes (auto needs them in it)
LOGPROBS = {"logprobs": True, "top_logprobs": 3}


def make_spec(tmp_path, model, model_fields: dict | None = None, **sections):
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model, **sections)
    data["model"].update(model_fields or {})
    return spec_from_dict(data)


def batch_spec(tmp_path, model, **sections):
    data = job_dict(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), model, **sections)
    data["input"] = {"uri": str(tmp_path / "in.jsonl"), "format": "openai-batch"}
    return spec_from_dict(data)


@pytest.fixture(scope="module")
def loop(tiny_model, tmp_path_factory):
    """One engine for every stage list here: build_stages asks it only for its tokenizer and context."""
    threads = torch.get_num_threads()
    spec = make_spec(tmp_path_factory.mktemp("loop"), tiny_model)
    yield EngineLoop(lambda: create_engine(spec))
    torch.set_num_threads(threads)


def stages_of(spec, loop, kind=TaskKind.PROCESS):
    return build_stages(spec, loop, {}, loop.engine.describe()).for_task(kind)


def names(spec, loop, kind=TaskKind.PROCESS) -> list[str]:
    return [stage.name for stage in stages_of(spec, loop, kind)]


# -- the list ---------------------------------------------------------------------------------------


def test_a_plain_job_reads_renders_generates_and_writes(tmp_path, tiny_model, loop):
    assert names(make_spec(tmp_path, tiny_model), loop) == ["read_parquet", "render", "generate", "write"]


def test_the_row_cache_looks_up_before_generating_and_keeps_after_writing(tmp_path, tiny_model, loop):
    spec = make_spec(tmp_path, tiny_model, cache=CACHE)
    assert names(spec, loop) == ["read_parquet", "render", "cache_lookup", "generate", "write", "cache_keep"]


def test_filters_and_evaluation_are_stages_only_when_asked_for(tmp_path, tiny_model, loop):
    assert names(make_spec(tmp_path, tiny_model, filters=FILTERS), loop) == [
        "read_parquet", "render", "generate", "filter", "write"
    ]  # fmt: skip
    assert names(make_spec(tmp_path, tiny_model, evaluation=EVALUATION), loop) == [
        "read_parquet", "render", "generate", "evaluate", "write"
    ]  # fmt: skip


def test_the_reasoning_split_follows_generate_only_when_asked_for(tmp_path, tiny_model, loop):
    assert names(make_spec(tmp_path, tiny_model, generation=REASONING), loop) == [
        "read_parquet", "render", "generate", "reasoning", "write"
    ]  # fmt: skip


def test_every_feature_on_in_the_order_a_row_travels(tmp_path, tiny_model, loop):
    spec = make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS, evaluation=EVALUATION)
    assert names(spec, loop) == [
        "read_parquet", "render", "cache_lookup", "generate", "filter", "evaluate", "write", "cache_keep"
    ]  # fmt: skip
    spec = make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS, evaluation=EVALUATION, generation=REASONING)
    assert names(spec, loop) == [
        "read_parquet", "render", "cache_lookup", "generate", "reasoning", "filter", "evaluate", "write", "cache_keep"
    ]  # fmt: skip


def test_the_row_cache_misses_entries_without_what_the_parse_stages_read(tmp_path, tiny_model, loop):
    plain, thinking = (
        stages_of(make_spec(tmp_path, tiny_model, cache=CACHE, **more), loop) for more in ({}, {"generation": REASONING})
    )
    lookup = {stage.name: stage for stage in thinking}["cache_lookup"]
    assert lookup.needs == {"token_ids"}
    assert {stage.name: stage for stage in plain}["cache_lookup"].needs == frozenset()


def test_logprobs_are_asked_before_the_row_cache_and_written_after_generating(tmp_path, tiny_model, loop):
    spec = make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS, generation=LOGPROBS)
    assert names(spec, loop) == [
        "read_parquet", "render", "ask_logprobs", "cache_lookup", "generate", "logprobs", "filter", "write", "cache_keep"
    ]  # fmt: skip
    # The cache's lookup misses an entry without token ids, which the logprobs stage reads.
    assert stages_of(spec, loop)[3].needs == {"token_ids"}


ADAPTERS = {"model_fields": {"adapters": {"poem": "/adapters/poem"}}, "input": {"adapter_column": "topic"}}


def test_adapters_are_chosen_after_render_and_before_the_cache(tmp_path, tiny_model, loop):
    # The row cache's keys hold each request's adapter, so it is chosen first.
    assert names(make_spec(tmp_path, tiny_model, cache=CACHE, **ADAPTERS), loop) == [
        "read_parquet", "render", "adapter", "cache_lookup", "generate", "write", "cache_keep"
    ]  # fmt: skip


def test_structured_output_asks_before_the_cache_and_checks_before_the_filters(tmp_path, tiny_model, loop):
    for asked in ({"generation": {"structured": {"regex": "[a-z]+"}}}, {"input": {"schema_column": "schema"}}):
        spec = make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS, evaluation=EVALUATION, **asked)
        assert names(spec, loop) == [
            "read_parquet", "render", "ask_structured", "cache_lookup", "generate", "check_structured", "filter",
            "evaluate", "write", "cache_keep",
        ]  # fmt: skip
        # A cache entry without token ids (an older bulkgen's) cannot be checked: a miss.
        assert next(s for s in stages_of(spec, loop) if s.name == "cache_lookup").needs == {"token_ids"}


def test_a_batch_input_has_the_batch_reader_and_its_render(tmp_path, tiny_model, loop):
    # Its lines may ask for structured output and logprobs (response_format, logprobs): those stages are there.
    assert names(batch_spec(tmp_path, tiny_model), loop) == [
        "read_batch", "render_batch", "ask_structured", "ask_logprobs", "generate", "check_structured", "logprobs",
        "write",
    ]  # fmt: skip


def test_retry_failed_reads_the_dead_letters_then_goes_the_same_way(tmp_path, tiny_model, loop):
    for spec in (make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS), batch_spec(tmp_path, tiny_model)):
        process, retry = names(spec, loop), names(spec, loop, TaskKind.RETRY_FAILED)
        assert retry == ["read_dead_letters", *process[1:]]
    # The same stage objects: the row cache's entries held by one are the ones published.
    stages = build_stages(make_spec(tmp_path, tiny_model, cache=CACHE), loop, {}, loop.engine.describe())
    assert stages.for_task(TaskKind.PROCESS)[1:] == stages.for_task(TaskKind.RETRY_FAILED)[1:]


# -- what the stages declare -----------------------------------------------------------------------

INPUT = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("topic", pa.string()), ("reference", pa.string()), ("schema", pa.string())]
)


def _fields(fields) -> list[tuple[str, str]]:
    return sorted((f.name, str(f.type)) for f in fields)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"output": {"include_prompt": True}},
        {"cache": CACHE, "filters": FILTERS},
        {"evaluation": EVALUATION},
        {"evaluation": EVALUATION, "input": {"pass_through": ["topic", "reference"]}},
        {"input": {"id_column": None}, "filters": FILTERS, "evaluation": EVALUATION},
        {"generation": REASONING, "filters": FILTERS, "output": {"include_prompt": True}},
        {"generation": {"logprobs": True}},
        {"generation": LOGPROBS, "filters": FILTERS},
        {"generation": {**REASONING, **LOGPROBS}},
        {**ADAPTERS, "filters": FILTERS},
        {"generation": {"structured": {"choices": ["a", "b"]}}, "filters": FILTERS},
        {"input": {"schema_column": "schema"}},
        {"generation": {"structured": {"json_object": True}, **LOGPROBS}, "output": {"include_prompt": True}},
    ],
    ids=["plain", "include-prompt", "cache-filters", "evaluation", "reference-passed-through", "derived-id-all",
         "reasoning", "logprobs", "top-logprobs-filters", "reasoning-logprobs", "adapters", "structured",
         "row-schemas", "structured-logprobs"],  # fmt: skip
)
def test_the_declared_columns_are_the_files_schemas(tmp_path, tiny_model, loop, sections):
    spec = make_spec(tmp_path, tiny_model, **sections)
    schema = INPUT if spec.input.id_column else INPUT.remove(0)
    declared = [stage.columns(schema) for stage in stages_of(spec, loop)]
    data = [f for c in declared for f in c.data]
    assert _fields(data) == _fields(data_fields(spec, schema))
    filtered = [f for c in declared for f in c.filtered]
    if spec.filters is not None:  # filtered/ is written only then
        assert _fields(data + filtered) == _fields(filtered_fields(spec, schema))
    else:
        assert filtered == []
    assert _fields(f for c in declared for f in c.errors) == _fields(error_fields(spec, schema))


def test_the_declared_columns_of_a_batch_input_are_its_files_schemas(tmp_path, tiny_model, loop):
    from jobs.core.rows import BATCH_FIELDS

    spec, schema = batch_spec(tmp_path, tiny_model), pa.schema(BATCH_FIELDS)
    declared = [stage.columns(schema) for stage in stages_of(spec, loop)]
    assert _fields(f for c in declared for f in c.data) == _fields(data_fields(spec, schema))
    assert _fields(f for c in declared for f in c.errors) == _fields(error_fields(spec, schema))


def test_each_counter_is_a_tally_field_counted_by_one_stage(tmp_path, tiny_model, loop):
    spec = make_spec(tmp_path, tiny_model, cache=CACHE, filters=FILTERS, evaluation=EVALUATION, generation=REASONING)
    counters = [name for stage in stages_of(spec, loop) for name in stage.counters]
    assert sorted(counters) == sorted(TALLY_FIELDS)


SHORT = {"input": {"max_new_tokens_column": "budget"}}  # even rows get 2 new tokens: min_completion_tokens drops them


def write_input(tmp_path, rows: int = ROWS) -> None:
    """Prompts with a reference and a budget each, and one row that cannot be rendered (a dead letter)."""
    budget = pa.array([2 if i % 2 == 0 else 8 for i in range(rows)], pa.int32())
    references = [f"a note {i}" for i in range(rows)]
    path = write_prompts(tmp_path / "in" / "p.parquet", rows, reference=references, budget=budget)
    table = pq.read_table(path)
    prompts = table.column("prompt").to_pylist()
    prompts[1] = None
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), path)


@pytest.mark.parametrize("generation", [{}, LOGPROBS], ids=["plain", "logprobs"])
def test_each_stage_adds_only_the_columns_and_counters_it_declares(tmp_path, tiny_model, loop, generation):
    write_input(tmp_path)
    spec = make_spec(tmp_path, tiny_model, filters=FILTERS, evaluation=EVALUATION, generation=generation, **SHORT)
    [shard] = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)
    work = ShardWork(ShardTask(shard, "attempt-0-stages"))
    for stage in stages_of(spec, loop):
        before = work
        work = stage.run(before)
        changed = {name for name in TALLY_FIELDS if getattr(work.tally, name) != getattr(before.tally, name)}
        assert changed <= set(stage.counters), stage.name
        declared = {f.name for f in stage.columns(work.input_schema).data}
        added = {name for g in work.generated.values() for name in g.columns} - {
            name for g in before.generated.values() for name in g.columns
        }
        assert added <= declared, stage.name
    assert work.tally.rows_filtered > 0 and set(work.staged) == {"data", "errors", "filtered"}
    if generation:  # every written sequence has a logprob and a top 3 per token
        for r in pq.read_table(work.staged["data"]).to_pylist() + pq.read_table(work.staged["filtered"]).to_pylist():
            assert len(r["token_ids"]) == len(r["token_logprobs"]) == len(r["top_logprobs"]) == r["completion_tokens"]
            assert all(len(top) == 3 for top in r["top_logprobs"])


# -- the tally in the ShardResult ------------------------------------------------------------------


def test_the_tally_counts_what_the_staged_files_hold(tmp_path, tiny_model):
    write_input(tmp_path)
    spec = make_spec(
        tmp_path, tiny_model, cache={"uri": str(tmp_path / "cache")}, filters=FILTERS, evaluation=EVALUATION,
        generation={"do_sample": True, "num_return_sequences": 2}, **SHORT,
    )  # fmt: skip
    [shard] = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)

    def run(attempt: str):
        replica = configured_replica(spec)
        result = shard_result(replica, ShardTask(shard, attempt))
        files = {kind: pq.read_table(url) for kind, url in result.staged.items()}
        return replica, result, files

    replica, first, files = run("attempt-0-a")
    data, errors = files["data"], files["errors"]
    filtered = files.get("filtered", pa.table({"id": pa.array([], pa.string())}))
    assert first.tally == Tally(
        rows_done=data.num_rows,
        rows_failed=errors.num_rows,
        rows_filtered=filtered.num_rows,
        prompt_tokens=sum(data.column("prompt_tokens").to_pylist()),
        completion_tokens=sum(data.column("completion_tokens").to_pylist()),
    )
    assert errors.num_rows == 2  # the row without a prompt, both its samples
    assert set(filtered.column("filter").to_pylist()) == {"min_completion_tokens"}
    assert (data.num_rows, filtered.num_rows) == (4, 6)  # rows 3 and 5 (1 has no prompt), rows 0, 2 and 4
    assert {"bleu", "chrf", "reference"} <= set(data.column_names)
    # What was generated (filtered rows too) waits for the commit, then enters the cache.
    assert replica.publish_cache("attempt-0-a") == 2 * (ROWS - 1)
    assert replica.publish_cache("attempt-0-a") == 0  # published once

    _, again, files = run("attempt-1-b")  # the same rows, now all in the cache
    assert again.tally == first.tally + Tally(rows_cached=data.num_rows)
    assert files["data"].equals(data)
    assert json.loads(pq.read_schema(again.staged["data"]).metadata[b"bulkgen"])["engine"] == "transformers"


def test_the_reasoning_split_writes_the_answer_and_the_cache_keeps_the_generated_text(tmp_path, thinking_model):
    """On the model that thinks, in-process: data/ holds the answer, the thinking and its tokens; the row
    cache holds the text as generated (jobs that split nothing share its entries), and a hit splits alike."""
    from transformers import AutoTokenizer

    from tests.tiny_model import THINKING_ANSWERS

    prompts = list(THINKING_ANSWERS)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    pq.write_table(pa.table({"id": ["poem", "count"], "messages": messages}), tmp_path / "chat.parquet")
    spec = make_spec(
        tmp_path, thinking_model, cache={"uri": str(tmp_path / "cache")},
        generation={"reasoning": "auto", "max_new_tokens": 24},
        input={"uri": str(tmp_path / "chat.parquet"), "prompt_column": None, "messages_column": "messages",
               "pass_through": []},
    )  # fmt: skip
    [shard] = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    replica = configured_replica(spec)
    first = shard_result(replica, ShardTask(shard, "attempt-0-think"))
    data = pq.read_table(first.staged["data"]).to_pylist()
    for row, (thinking, answer) in zip(data, THINKING_ANSWERS.values()):
        assert (row["reasoning"], row["text"], row["finish_reason"]) == (thinking, answer, "stop")
        assert row["reasoning_tokens"] == len(ids(f"{thinking}</think>"))
        assert row["completion_tokens"] == len(ids(f"{thinking}</think>{answer}"))  # the thinking included
    assert first.tally.reasoning_tokens == sum(r["reasoning_tokens"] for r in data) > 0

    assert replica.publish_cache("attempt-0-think") == 2
    kept = sorted(json.loads(p.read_text())["text"] for p in (tmp_path / "cache").rglob("*.json"))
    assert kept == sorted(f"{t}</think>{a}" for t, a in THINKING_ANSWERS.values())
    again = shard_result(replica, ShardTask(shard, "attempt-1-think"))
    assert again.tally == first.tally + Tally(rows_cached=2)
    assert pq.read_table(again.staged["data"]).to_pylist() == data
