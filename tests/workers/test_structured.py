"""Structured output on the transformers engine and through a replica's stages, in-process on the
tiny random Llama: whatever the model would write, every completion satisfies its constraint, or
is a dead letter that says why. (vLLM: tests/workers/test_vllm_engine.py; whole jobs on both
engines: tests/ray/test_structured_job.py.)"""

from __future__ import annotations

import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.plan import plan
from jobs.core.protocol import ShardTask
from jobs.core.spec import spec_from_dict
from jobs.core.structured import Structured, canonical_json
from jobs.dataset import open_dataset
from tests.conftest import job_dict, write_prompts
from tests.workers.conftest import configured_replica, shard_result
from workers.engine import Request, generate
from workers.engine_factory import create_engine

pytestmark = pytest.mark.usefixtures("keep_torch_threads")

# Bounded whatever the random model picks: at most ~25 tokens.
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["label", "n"],
    "additionalProperties": False,
}
TOO_LONG = {"type": "string", "minLength": 50}  # never whole within 8 tokens
JSON_SCHEMA = Structured("json_schema", canonical_json(SCHEMA))
CHOICES = ("yes", "no", "maybe so")
REGEX = "[a-z]{3}-[0-9]{2}"
PROMPTS = ["Write a short poem about the sea", "Return the number of items", "lists", "The quick brown fox"]


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("structured")
    data = job_dict(str(out / "in"), str(out / "out"), tiny_model, generation={"structured": {"json_object": True}})
    return create_engine(spec_from_dict(data))


def run(engine, structured, max_new: int = 40, seeds=range(len(PROMPTS)), prompts=PROMPTS):
    tok = engine.tokenizer
    requests = [
        Request(i, tuple(tok(p).input_ids), seed, max_new, structured=s)
        for i, (p, seed, s) in enumerate(zip(prompts, seeds, structured))
    ]
    return generate(engine, requests)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_completion_follows_the_schema(engine, sampled):
    from dataclasses import replace

    params = replace(engine.params, do_sample=sampled)
    engine.params, before = params, engine.params
    try:
        done = run(engine, [JSON_SCHEMA] * len(PROMPTS))
    finally:
        engine.params = before
    for c in done:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop" and len(c.token_ids) < 40
        assert engine.grammars.satisfied(JSON_SCHEMA, c.token_ids) == (True, "")  # each token was one it allowed


def test_choices_and_a_regex_are_matched_whole(engine):
    done = run(engine, [Structured("choice", CHOICES), Structured("regex", REGEX)] * 2)
    assert {c.text for c in done[0::2]} <= set(CHOICES)
    assert all(re.fullmatch(REGEX, c.text) for c in done[1::2])


def test_a_complete_grammar_ends_the_sequence_without_an_end_token_step(engine):
    steps = engine.counters["steps"]
    [c] = run(engine, [Structured("choice", ("lists",))], prompts=["Return the number of items"])
    assert (c.text, c.finish_reason) == ("lists", "stop")
    # The prefill chose the first token, each decode step one more: no step spent on an end token.
    assert engine.counters["steps"] - steps == len(c.token_ids) - 1


def test_a_constraint_too_long_for_the_limit_ends_at_the_limit(engine):
    [c] = run(engine, [Structured("json_schema", canonical_json(TOO_LONG))], max_new=8, prompts=PROMPTS[:1])
    assert c.finish_reason == "length" and len(c.token_ids) == 8 and c.text.startswith('"')


def test_unconstrained_rows_beside_constrained_ones_are_as_without_them(engine):
    free = run(engine, [None] * len(PROMPTS), max_new=12)
    mixed = run(engine, [None, JSON_SCHEMA, None, Structured("regex", REGEX)], max_new=12)
    assert [mixed[0], mixed[2]] == [free[0], free[2]]
    assert mixed[1].text != free[1].text


def test_logprobs_under_a_constraint_are_those_of_what_it_allows(engine):
    tok = engine.tokenizer
    [c] = generate(engine, [Request(0, tuple(tok(PROMPTS[0]).input_ids), 0, 40, structured=JSON_SCHEMA, logprobs=5)])
    jsonschema.validate(json.loads(c.text), SCHEMA)
    m, forced = engine.grammars.matcher(JSON_SCHEMA), 0
    for token, logprob, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs):
        assert all(t in engine.eos_ids or m.deep_copy().consume_token(t) for t, _ in top)  # the mask came first
        if len(top) == 1:  # a forced token ('{"label":"'): the only one allowed, so certain
            assert logprob == pytest.approx(0.0, abs=1e-6)
            forced += 1
        engine.grammars.advance(m, token)
    assert forced > 0


# -- through a replica's stages ------------------------------------------------------------------


def write_schemas(tmp_path, schemas: list) -> None:
    """Prompts with a schema column: a row's schema as JSON text, or null."""
    path = write_prompts(tmp_path / "in" / "p.parquet", len(schemas))
    table = pq.read_table(path)
    texts = [s if s is None or isinstance(s, str) else json.dumps(s) for s in schemas]
    pq.write_table(table.append_column("schema", pa.array(texts, pa.string())), path)


def run_shard(spec, attempt: str = "attempt-0-a"):
    [shard] = plan(open_dataset(spec.input).files, spec.shards.rows_per_shard)
    replica = configured_replica(spec)
    result = shard_result(replica, ShardTask(shard, attempt))
    return replica, {kind: pq.read_table(url).to_pylist() for kind, url in result.staged.items()}


ROW_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def test_each_row_follows_its_own_schema_or_the_jobs(tmp_path, tiny_model):
    bad = '{"type": "array", "uniqueItems": true}'  # validation refuses it; a replica makes it the row's dead letter
    write_schemas(tmp_path, [SCHEMA, ROW_SCHEMA, None, bad, TOO_LONG, ROW_SCHEMA])
    spec = spec_from_dict(job_dict(
        str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
        input={"schema_column": "schema"}, generation={"max_new_tokens": 24, "structured": {"regex": REGEX}},
        cache={"uri": str(tmp_path / "cache")},
    ))  # fmt: skip
    replica, files = run_shard(spec)
    data = {r["id"]: r for r in files["data"]}
    errors = {r["id"]: r for r in files["errors"]}
    assert sorted(data) == ["row-00000", "row-00001", "row-00002", "row-00005"]
    jsonschema.validate(json.loads(data["row-00000"]["text"]), SCHEMA)
    for row in ("row-00001", "row-00005"):
        jsonschema.validate(json.loads(data[row]["text"]), ROW_SCHEMA)
    assert re.fullmatch(REGEX, data["row-00002"]["text"])  # a null schema: the job's constraint
    assert [(data[r]["structured"], data[r]["json_parsed"]) for r in sorted(data)] == [
        ("json_schema", True), ("json_schema", True), ("regex", None), ("json_schema", True)
    ]  # fmt: skip
    assert errors["row-00003"]["error_code"] == "bad_schema"
    assert "input.schema_column 'schema' has a schema llguidance cannot use" in errors["row-00003"]["error"]
    assert errors["row-00004"]["error_code"] == "structured_incomplete"
    assert errors["row-00004"]["error"].startswith("max_new_tokens 24 reached before the completion satisfied its JSON schema")
    assert errors["row-00004"]["schema"] == json.dumps(TOO_LONG)  # what it needs to be generated again

    # The row cache keeps the sequences that satisfied their constraint, and a hit is checked the same way.
    assert replica.publish_cache("attempt-0-a") == 4
    _, again = run_shard(spec, "attempt-1-b")
    assert again["data"] == files["data"] and again["errors"] == files["errors"]


def test_a_schema_column_without_a_job_constraint_leaves_null_rows_free(tmp_path, tiny_model):
    write_schemas(tmp_path, [ROW_SCHEMA, None])
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                                   input={"schema_column": "schema"}, generation={"max_new_tokens": 12}))  # fmt: skip
    _, files = run_shard(spec)
    constrained, free = files["data"]
    jsonschema.validate(json.loads(constrained["text"]), ROW_SCHEMA)
    assert (free["structured"], free["json_parsed"]) == (None, None)


def batch_line(line: int, **body) -> dict:
    """A batch row as the batch reader gives it."""
    request = {"custom_id": f"c{line}", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "hi"}], **body}}  # fmt: skip
    return {"custom_id": f"c{line}", "line": line, "url": request["url"], "request": json.dumps(request)}


def test_a_batch_line_asks_for_its_own_constraint_or_for_none(tmp_path, tiny_model):
    from workers.stages.structured import AskStructured

    data = job_dict(str(tmp_path / "b.jsonl"), str(tmp_path / "out"), tiny_model, generation={"structured": {"regex": "[a-z]+"}})
    data["input"] = {"uri": str(tmp_path / "b.jsonl")}
    ask = AskStructured(spec_from_dict(data))
    assert ask.constraint(batch_line(1)) == Structured("regex", "[a-z]+")  # the job's
    assert ask.constraint(batch_line(2, response_format={"type": "json_object"})) == Structured("json_object")
    assert ask.constraint(batch_line(3, response_format={"type": "text"})) is None  # the line opts out


@pytest.mark.parametrize(
    "generation, says",
    [({"stop": ["}"]}, "generation.stop"), ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
     ({"reasoning": {"start": "<a>", "end": "</a>"}}, "generation.reasoning")],
)  # fmt: skip
def test_a_batch_lines_constraint_beside_what_the_spec_refuses_is_a_bad_request(tmp_path, tiny_model, generation, says):
    # The spec refuses these beside its own constraint; a line's would meet them just the same:
    # a stop string "}" cut every json_object answer to "{" and it was written as valid.
    from jobs.core.prompts import RowError
    from workers.stages.structured import AskStructured

    data = job_dict(str(tmp_path / "b.jsonl"), str(tmp_path / "out"), tiny_model, generation=generation)
    data["input"] = {"uri": str(tmp_path / "b.jsonl")}
    ask = AskStructured(spec_from_dict(data))
    assert ask.constraint(batch_line(4)) is None  # a line that asks for none runs as before
    with pytest.raises(RowError) as info:
        ask.constraint(batch_line(5, response_format={"type": "json_object"}))
    assert info.value.code == "bad_request" and str(info.value).startswith("line 5: ") and says in str(info.value)
