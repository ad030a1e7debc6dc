"""The OpenAI batch format without Ray: lines to requests and rows, the driver's scan, output lines."""

from __future__ import annotations

import codecs
import json

import pytest
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from jobs.batch_output import shard_lines
from jobs.core import row_prompt
from jobs.core.errors import InputError, SpecError
from jobs.core.openai_batch import BAD_REQUEST, CHAT, COMPLETIONS, build_prompt, parse_request, request_of, samples
from jobs.core.prompts import EMPTY_PROMPT, RowError
from jobs.core.rows import data_fields, error_fields, input_columns, iter_batch_lines, read_batch_rows
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from tests.tiny_model import build_tokenizer


def line(custom_id="q1", url=CHAT, **body) -> str:
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": "Write a short poem"}])
    else:
        body.setdefault("prompt", "The quick brown fox")
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def batch_spec(uri: str, **sections) -> dict:
    spec = {"input": {"uri": uri}, "model": {"path": "/m"}, "output": {"uri": "/out"}}
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return spec


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# -- a line to a request ---------------------------------------------------------------------


def test_chat_line_with_its_own_settings():
    r = parse_request(line(n=2, max_tokens=5, temperature=0.7, top_p=0.9, stop="\n", seed=3, model="gpt-x"), 1)
    assert (r.custom_id, r.url, r.prompt) == ("q1", CHAT, None)
    assert r.messages == [{"role": "user", "content": "Write a short poem"}]
    assert (r.n, r.max_tokens, r.seed) == (2, 5, 3)
    assert r.sampling == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "stop": ("\n",)}


def test_completion_line_and_what_is_left_to_the_spec():
    r = parse_request(line(url=COMPLETIONS, presence_penalty=0, logprobs=None, user="u"), 4)
    assert (r.url, r.prompt, r.messages) == (COMPLETIONS, "The quick brown fox", None)
    assert (r.n, r.max_tokens, r.seed, r.sampling) == (None, None, None, {})


def test_openai_meanings_of_settings():
    assert parse_request(line(temperature=0), 1).sampling == {"do_sample": False}  # 0 is greedy
    assert parse_request(line(max_tokens=9, max_completion_tokens=4), 1).max_tokens == 4  # the newer name wins
    assert parse_request(line(top_k=-1), 1).sampling == {"top_k": 0}  # vLLM's "off"
    assert parse_request(line(stop=["a", "bc"]), 1).sampling == {"stop": ("a", "bc")}
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert parse_request(line(messages=[{"role": "user", "content": parts}]), 1).messages[0]["content"] == "one\ntwo"


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected an object"),
        (json.dumps({"custom_id": "", "url": CHAT, "body": {}}), "custom_id"),
        (json.dumps({"custom_id": 7, "url": CHAT, "body": {}}), "custom_id"),
        (json.dumps({"custom_id": "a", "url": CHAT}), "body is missing"),
        (json.dumps({"custom_id": "a", "url": CHAT, "body": "hi"}), "body must be an object"),
        (json.dumps({"custom_id": "a", "url": "/v1/embeddings", "body": {}}), "url '/v1/embeddings'"),
        (json.dumps({"custom_id": "a", "method": "GET", "url": CHAT, "body": {}}), "method"),
        (json.dumps({"custom_id": "a", "url": CHAT, "body": {}}), "body.messages is missing"),
        (json.dumps({"custom_id": "a", "url": CHAT, "body": {"prompt": "x"}}), f"belongs to {COMPLETIONS}"),
        (line(url=COMPLETIONS, prompt=["a", "b"]), "body.prompt must be a string"),
        (line(messages="hi"), "body.messages must be a list"),
        (line(messages=[{"content": "x"}]), "string role"),
        (line(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text parts"),
        (line(n=0), "body.n"),
        (line(n=129), "body.n"),
        (line(n=True), "body.n must be an integer"),
        (line(max_tokens="5"), "body.max_tokens must be an integer"),
        (line(temperature=-1), "body.temperature"),
        (line(top_p=0), "body.top_p"),
        (line(stop=[""]), "body.stop"),
        (line(seed=1.5), "body.seed"),
        (line(tools=[{"type": "function"}]), "body.tools is not supported"),
        (line(logprobs=True), "body.logprobs is not supported"),
        (line(frequency_penalty=0.5), "body.frequency_penalty is not supported"),
        # Python's json reads these; JSON has no such numbers (a NaN temperature passes every range check).
        (line().replace('"body": {', '"body": {"temperature": NaN, '), "NaN is not a JSON number"),
        (line().replace('"body": {', '"body": {"top_p": Infinity, '), "Infinity is not a JSON number"),
        (line().replace('"body": {', '"body": {"metadata": {"w": -Infinity}, '), "-Infinity is not a JSON number"),
        (line().replace('"body": {', '"body": {"temperature": 1e400, '), "body.temperature must be a finite number"),
    ],
)
def test_a_malformed_line_is_a_bad_request_naming_its_line(text, says):
    with pytest.raises(RowError) as info:
        parse_request(text, 7)
    assert info.value.code == BAD_REQUEST == "bad_request"
    assert str(info.value).startswith("line 7: ") and says in str(info.value), str(info.value)


def test_samples_per_row():
    row = {"request": line(n=3), "line": 1}
    assert samples(row, 1) == 3
    assert samples({"request": line(), "line": 1}, 2) == 2  # the spec's n
    assert samples({"request": "{oops", "line": 1}, 4) == 1  # one dead letter
    assert request_of({"request": "{oops", "line": 1}) is None


# -- prompts -----------------------------------------------------------------------------------


def test_chat_and_completion_prompts(tokenizer):
    chat = {"request": line(messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]),
            "line": 1}  # fmt: skip
    text, ids = build_prompt(chat, tokenizer, context=128)
    assert text == "system: Be brief\nuser: Hi\nassistant:"  # the chat template, with the generation prompt
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    text, ids = build_prompt({"request": line(url=COMPLETIONS, prompt="Raise ValueError"), "line": 2}, tokenizer, 128)
    assert text == "Raise ValueError" and ids == tokenizer(text).input_ids


def test_prompt_errors_of_batch_rows(tokenizer):
    spec = spec_from_dict(batch_spec("/in/batch.jsonl")).input
    with pytest.raises(RowError) as info:
        row_prompt.build_prompt(spec, {"request": line(url=COMPLETIONS, prompt="  "), "line": 3}, tokenizer, 128)
    assert info.value.code == EMPTY_PROMPT
    with pytest.raises(RowError) as info:
        row_prompt.build_prompt(spec, {"request": "{", "line": 3}, tokenizer, 128)  # the replica's own call
    assert info.value.code == BAD_REQUEST and "line 3" in str(info.value)


# -- the spec ----------------------------------------------------------------------------------


def test_format_is_inferred_from_a_jsonl_input():
    spec = spec_from_dict(batch_spec("/in/batch.jsonl"))
    assert (spec.input.format, spec.input.id_column, spec.output.format) == ("openai-batch", "custom_id", "parquet")
    assert spec_from_dict(batch_spec("/in/", input={"format": "openai-batch"})).input.format == "openai-batch"
    # A .jsonl uri with a prompt column is a Parquet spec (whose input check then finds no Parquet files).
    assert spec_from_dict(batch_spec("/in/*.jsonl", input={"prompt_column": "p"})).input.format == "parquet"
    assert spec_from_dict(batch_spec("/in/p.parquet", input={"prompt_column": "p"})).input.format == "parquet"


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"format": "openai-batch", "prompt_column": "p"}, "prompt_column"),
        ({"pass_through": ["x"]}, "pass_through"),
        ({"max_new_tokens_column": "m"}, "max_new_tokens_column"),
        ({"id_column": "key"}, "custom_id"),
    ],
)
def test_batch_input_refuses_fields_its_lines_decide(extra, says):
    with pytest.raises(SpecError, match=says):
        spec_from_dict(batch_spec("/in/batch.jsonl", input=extra))


def test_a_batch_input_has_every_row_as_its_error_budget():
    # A provider fails no batch for its bad lines: they are errors.jsonl lines, counted in request_counts.
    assert spec_from_dict(batch_spec("/in/batch.jsonl")).shards.max_failed_fraction == 1.0
    given = spec_from_dict(batch_spec("/in/batch.jsonl", shards={"max_failed_fraction": 0.0, "rows_per_shard": 3}))
    assert (given.shards.max_failed_fraction, given.shards.rows_per_shard) == (0.0, 3)
    parquet = spec_from_dict(batch_spec("/in/p.parquet", input={"prompt_column": "p"}))
    assert parquet.shards.max_failed_fraction == 0.0  # a Parquet input's rows are the user's data: none may fail
    assert spec_from_dict(batch_spec("/in/batch.jsonl")).fingerprint() == spec_from_dict(
        batch_spec("/in/batch.jsonl", shards={"max_failed_fraction": 0.0})
    ).fingerprint()  # the budget decides no row: resuming with another one is allowed


def test_a_recorded_batch_spec_loads_unchanged():
    spec = spec_from_dict(batch_spec("/in/batch.jsonl", output={"format": "openai-batch"}))
    again = spec_from_dict(spec.model_dump(mode="json"))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert spec_from_dict(batch_spec("/in/batch.jsonl")).fingerprint() != spec.fingerprint()  # output.format decides


# -- rows are lines ----------------------------------------------------------------------------


def write_batch(path, lines: list[str]) -> str:
    path.write_text("".join(text + "\n" for text in lines))
    return str(path)


def test_rows_are_non_blank_lines_read_by_range(tmp_path):
    uri = write_batch(tmp_path / "b.jsonl", [line("a"), "", line("b"), "   ", line("c", COMPLETIONS), "{oops"])
    assert [(i, n) for i, n, _ in iter_batch_lines(uri, {})] == [(0, 1), (1, 3), (2, 5), (3, 6)]
    table = read_batch_rows(uri, {}, "b.jsonl", 1, 4)
    assert table.column_names == ["custom_id", "line", "url", "request"]
    assert table.to_pylist()[0] == {"custom_id": "b", "line": 3, "url": CHAT, "request": line("b")}
    # A line whose custom_id cannot be read has the derived id: file and row index.
    assert table.column("custom_id").to_pylist() == ["b", "c", "b.jsonl:3"]
    assert table.column("url").to_pylist() == [CHAT, COMPLETIONS, None]


def test_a_bom_before_the_first_line_is_no_part_of_it(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + f"{line('a')}\n{line('b')}\n".encode())
    rows = read_batch_rows(str(path), {}, "b.jsonl", 0, 2).to_pylist()
    assert [(r["custom_id"], r["request"]) for r in rows] == [("a", line("a")), ("b", line("b"))]
    assert parse_request(rows[0]["request"], 1).custom_id == "a"  # a request, not a dead letter
    path.write_bytes(codecs.BOM_UTF8 + f"\n{line('a')}\n".encode())  # a BOM alone: a blank line
    assert [(i, n) for i, n, _ in iter_batch_lines(str(path), {})] == [(0, 2)]


def test_columns_of_a_batch_job(tmp_path):
    spec = spec_from_dict(batch_spec("/in/batch.jsonl"))
    schema = read_batch_rows(write_batch(tmp_path / "b.jsonl", [line()]), {}, "b.jsonl", 0, 1).schema
    assert input_columns(spec.input) == ["custom_id", "line", "url", "request"]
    assert [f.name for f in data_fields(spec, schema)] == [
        "custom_id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens", "url"
    ]  # fmt: skip
    assert [f.name for f in error_fields(spec, schema)] == [
        "custom_id", "sample_index", "error_code", "error", "line", "url", "request"
    ]  # fmt: skip


def test_the_driver_counts_rows_and_samples(tmp_path):
    uri = write_batch(tmp_path / "b.jsonl", [line("a", n=3), "", line("b"), "{oops", line("c", COMPLETIONS, n=2)])
    spec = spec_from_dict(batch_spec(uri))
    dataset = open_dataset(spec.input)
    assert [f.num_rows for f in dataset.files] == [4]
    assert dataset.output_rows(1) == 3 + 1 + 1 + 2  # the malformed line: one dead letter
    assert dataset.output_rows(4) == 3 + 4 + 1 + 2


def test_a_duplicate_custom_id_names_both_lines(tmp_path):
    uri = write_batch(tmp_path / "b.jsonl", [line("a"), line("b"), "", line("a", COMPLETIONS)])
    with pytest.raises(InputError, match=r"custom_id 'a' is not unique: it is on lines 1 and 4 of .*b\.jsonl"):
        open_dataset(spec_from_dict(batch_spec(uri)).input)


def test_a_duplicate_across_files_names_both(tmp_path):
    (tmp_path / "in").mkdir()
    write_batch(tmp_path / "in" / "1.jsonl", [line("a"), line("b")])
    write_batch(tmp_path / "in" / "2.jsonl", [line("c"), line("b")])
    spec = spec_from_dict(batch_spec(str(tmp_path / "in"), input={"format": "openai-batch"}))
    with pytest.raises(InputError, match=r"'b' .* line 2 of .*1\.jsonl and line 2 of .*2\.jsonl"):
        open_dataset(spec.input)


def test_a_directory_without_batch_files(tmp_path):
    spec = spec_from_dict(batch_spec(str(tmp_path), input={"format": "openai-batch"}))
    with pytest.raises(InputError, match=r"matches no \.jsonl files"):
        open_dataset(spec.input)


# -- output lines ------------------------------------------------------------------------------


def sample(custom_id, s, text, url=CHAT, finish="stop", tokens=2, prompt_tokens=7) -> dict:
    return {"custom_id": custom_id, "sample_index": s, "text": text, "finish_reason": finish,
            "prompt_tokens": prompt_tokens, "completion_tokens": tokens, "url": url}  # fmt: skip


def test_output_and_error_lines_in_the_providers_shape():
    spec = spec_from_dict(batch_spec("/in/batch.jsonl", output={"format": "openai-batch"}))
    data = [
        sample("chat", 1, "b", finish="length", tokens=3), sample("chat", 0, "a"),
        sample("done", 0, "x", url=COMPLETIONS), sample("half", 0, "kept out"),
    ]  # fmt: skip
    errors = [
        {"custom_id": "half", "sample_index": 1, "error_code": "generation_error", "error": "boom", "line": 4,
         "request": line("half")},
        {"custom_id": "b.jsonl:5", "sample_index": 0, "error_code": BAD_REQUEST, "error": "line 6: not JSON",
         "line": 6, "request": "{oops"},
    ]  # fmt: skip
    responses, failures = shard_lines(spec, data, errors, created=1_700_000_000)

    assert [r["custom_id"] for r in responses] == ["chat", "done"]  # input order; "half" failed
    chat = responses[0]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"].startswith("req_")
    body = ChatCompletion.model_validate(chat["response"]["body"])
    assert [(c.index, c.message.content, c.finish_reason) for c in body.choices] == [(0, "a", "stop"), (1, "b", "length")]
    assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (7, 5, 12)
    assert body.object == "chat.completion" and body.model == "/m" and body.system_fingerprint == spec.fingerprint()
    done = Completion.model_validate(responses[1]["response"]["body"])
    assert done.object == "text_completion" and done.choices[0].text == "x"

    assert [f["custom_id"] for f in failures] == ["half", None]  # no readable custom_id: null
    for f in failures:
        assert f["response"] is None and f["id"].startswith("batch_req_")
        BatchError.model_validate(f["error"])
    assert failures[1]["error"] == {"code": BAD_REQUEST, "message": "line 6: not JSON", "param": None, "line": 6}
    assert shard_lines(spec, data, errors, created=1_700_000_000) == (responses, failures)  # deterministic


def test_a_parquet_input_answers_by_its_prompt_source():
    spec = spec_from_dict({"input": {"uri": "/in", "messages_column": "m", "id_column": "key"},
                           "model": {"path": "/m"}, "output": {"uri": "/out", "format": "openai-batch"}})  # fmt: skip
    row = {"key": 12, "sample_index": 0, "text": "t", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
    (response,), _ = shard_lines(spec, [row], [], created=0)
    assert response["custom_id"] == "12"
    assert ChatCompletion.model_validate(response["response"]["body"]).choices[0].message.content == "t"


def test_a_request_whose_every_sample_was_filtered_is_an_error_line():
    from jobs.batch_output import FILTERED, shard_lines

    spec = spec_from_dict(
        {"input": {"uri": "/in/b.jsonl"}, "model": {"path": "m"}, "output": {"uri": "/o", "format": "openai-batch"}}
    )
    request = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
    kept = {"custom_id": "b", "sample_index": 0, "text": "t", "finish_reason": "stop", "prompt_tokens": 1,
            "completion_tokens": 1, "url": "/v1/completions"}  # fmt: skip
    dropped = [
        {"custom_id": "a", "sample_index": 0, "filter": "empty", "line": 1, "request": request},
        {"custom_id": "b", "sample_index": 1, "filter": "near_duplicate", "line": 2, "request": request},
    ]
    responses, failures = shard_lines(spec, [kept], [], 0, dropped)
    assert [r["custom_id"] for r in responses] == ["b"]  # its kept sample answers it
    assert [(f["custom_id"], f["error"]["code"]) for f in failures] == [("a", FILTERED)]
