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
from jobs.core.openai_batch import (
    BAD_REQUEST,
    CHAT,
    COMPLETIONS,
    build_prompt,
    parse_request,
    request_of,
    response_line,
    samples,
)
from jobs.core.prompts import BAD_ENCODING, EMPTY_PROMPT, RowError
from jobs.core.rows import data_fields, error_fields, input_columns, iter_batch_lines, read_batch_rows
from jobs.core.spec import spec_from_dict
from jobs.core.structured import Structured
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
        (line(logprobs=1), "body.logprobs must be true or false"),
        (line(top_logprobs=2), "body.top_logprobs needs body.logprobs: true"),
        (line(logprobs=True, top_logprobs=21), "body.top_logprobs must be in [0, 20]"),
        (line(url=COMPLETIONS, logprobs=6), "body.logprobs must be in [0, 5]"),
        (line(url=COMPLETIONS, logprobs=True, top_logprobs=1), "body.top_logprobs belongs to"),
        (line(response_format={"type": "xml"}), "body.response_format.type 'xml' is not supported"),
        (line(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema.schema must be an object"),
        (line(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}),
         "body.response_format.json_schema.schema: llguidance cannot use it: "),
        (line(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "not both"),
        (line(response_format={"type": "text"}, structured_outputs={"regex": "a"}), "not both"),
        (line(structured_outputs={"regex": "a(b"}), "body.structured_outputs: llguidance cannot use it"),
        (line(structured_outputs={"regex": "a", "choice": ["b"]}), "one of json, regex, choice, json_object"),
        (line(structured_outputs={"choice": []}), "choice must be a non-empty list"),
        (line(structured_outputs={}), "one of json, regex, choice, json_object (got [])"),
        (line(structured_outputs={"choice": ["a", ""]}), "non-empty list of non-empty strings"),
        (line(structured_outputs={"json": "{oops"}), "body.structured_outputs.json is not JSON"),
        (line(structured_outputs={"grammar": "root ::= x"}), "structured_outputs.grammar is not supported"),
        (line(response_format={"type": "json_object"}, stop="}"), "body.stop could cut a structured answer short"),
        (line(reasoning_effort="max"), "body.reasoning_effort must be one of"),
        (line(chat_template_kwargs={"tokenize": True}), "body.chat_template_kwargs.tokenize is bulkgen's to set"),
        (line(chat_template_kwargs=[1]), "body.chat_template_kwargs must be an object"),
        (line(chat_template_kwargs={"chat_template": "{{ 1 }}"}), "body.chat_template_kwargs.chat_template is bulkgen's"),
        (line(url=COMPLETIONS, reasoning_effort="low"), f"body.reasoning_effort belongs to {CHAT}"),
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


def test_what_a_line_asks_beyond_sampling():
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    r = parse_request(line(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}), 1)
    assert r.structured == Structured("json_schema", '{"type":"object","properties":{"z":{"type":"integer"},"a":{"type":"string"}}}')
    assert parse_request(line(response_format={"type": "json_object"}), 1).structured == Structured("json_object")
    text = parse_request(line(response_format={"type": "text"}), 1)
    assert (text.structured, text.unconstrained) == (None, True)  # text: no constraint, whatever the job's
    assert not parse_request(line(), 1).unconstrained
    assert parse_request(line(structured_outputs={"choice": ["yes", "no"]}), 1).structured == Structured("choice", ("yes", "no"))
    assert parse_request(line(structured_outputs={"regex": "[a-z]+"}), 1).structured == Structured("regex", "[a-z]+")
    assert parse_request(line(structured_outputs={"json": json.dumps(schema)}), 1).structured.kind == "json_schema"
    # logprobs: not mentioned -> the job's; false -> none; true -> the chosen tokens' (and the top K).
    assert parse_request(line(), 1).logprobs_for(3) == 3
    assert parse_request(line(logprobs=False), 1).logprobs_for(3) is None
    assert parse_request(line(logprobs=True), 1).logprobs_for(None) == 0
    assert parse_request(line(logprobs=True, top_logprobs=4), 1).logprobs_for(None) == 4
    assert parse_request(line(url=COMPLETIONS, logprobs=2), 1).logprobs_for(None) == 2
    r = parse_request(line(reasoning_effort="low", chat_template_kwargs={"enable_thinking": False}), 1)
    assert r.template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}
    assert parse_request(line(model="legal"), 1).model == "legal"


def test_chat_template_variables_reach_the_template():
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.chat_template = "{{ messages[0]['content'] }}{% if enable_thinking is defined %} think={{ enable_thinking }}{% endif %}"
    row = {"request": line(chat_template_kwargs={"enable_thinking": False}), "line": 1}
    assert build_prompt(row, tok, None)[0] == "Write a short poem think=False"


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


def test_a_line_that_is_not_utf8_is_a_dead_letter_not_a_guess(tmp_path):
    path = tmp_path / "b.jsonl"
    broken = line("bad", messages=[{"role": "user", "content": "caf\u00e9"}]).encode().replace(b"\\u00e9", b"\xe9")
    kept = line("ok", messages=[{"role": "user", "content": "a \ufffd stays"}])  # U+FFFD written on purpose is text
    path.write_bytes(broken + b"\n" + kept.encode() + b"\n")
    bad, ok = read_batch_rows(str(path), {}, "b.jsonl", 0, 2).to_pylist()
    assert bad["custom_id"] == "bad"  # still named by its custom_id, in errors/ and errors.jsonl
    with pytest.raises(RowError) as info:
        parse_request(bad["request"], bad["line"])
    assert info.value.code == BAD_ENCODING and str(info.value).startswith("line 1: not valid UTF-8")
    assert request_of(bad) is None and samples(bad, 3) == 1  # one dead letter
    assert parse_request(ok["request"], 2).messages[0]["content"] == "a \ufffd stays"


def test_columns_of_a_batch_job(tmp_path):
    spec = spec_from_dict(batch_spec("/in/batch.jsonl"))
    schema = read_batch_rows(write_batch(tmp_path / "b.jsonl", [line()]), {}, "b.jsonl", 0, 1).schema
    assert input_columns(spec.input) == ["custom_id", "line", "url", "request"]
    # A line may ask for structured output and logprobs: their columns are there, null where it did not.
    assert [f.name for f in data_fields(spec, schema)] == [
        "custom_id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens",
        "structured", "json_parsed", "token_ids", "token_logprobs", "top_logprobs", "logprob_sum", "url",
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


def fake_token(token_id: int) -> tuple[str, list[int]]:
    text = f"t{token_id}"
    return text, list(text.encode())


def test_logprobs_and_reasoning_in_the_providers_shape():
    top = [[{"token_id": 5, "logprob": -0.1}, {"token_id": 9, "logprob": -2.5}], [{"token_id": 6, "logprob": -0.2}],
           [{"token_id": 7, "logprob": -0.3}]]  # fmt: skip
    kept = {"token_ids": [5, 6, 7], "token_logprobs": [-0.1, -0.2, float("-inf")], "top_logprobs": top}
    chat = response_line("c", CHAT, [{**sample("c", 0, "answer", tokens=3), **kept, "reasoning": "hmm", "reasoning_tokens": 1},
                                     {**sample("c", 1, "plain", tokens=1), "reasoning": None, "reasoning_tokens": 0,
                                      "token_ids": [8], "token_logprobs": None, "top_logprobs": None}],
                         7, "/m", "fp", 1, fake_token)  # fmt: skip
    body = ChatCompletion.model_validate(chat["response"]["body"])
    first, second = body.choices
    assert first.message.content == "answer" and first.message.reasoning_content == "hmm"  # the providers' extra field
    # The thinking's token is left out of the answer's logprobs; -inf is written as OpenAI's -9999.0.
    assert [(t.token, t.logprob) for t in first.logprobs.content] == [("t6", -0.2), ("t7", -9999.0)]
    assert first.logprobs.content[0].bytes == list(b"t6")
    assert [(e.token, e.logprob) for e in first.logprobs.content[0].top_logprobs] == [("t6", -0.2)]
    assert second.logprobs is None and second.message.reasoning_content is None  # this sample did not ask
    assert body.usage.completion_tokens_details.reasoning_tokens == 1
    plain = response_line("c", CHAT, [sample("c", 0, "a")], 7, "/m", "fp", 1)["response"]["body"]
    assert "reasoning_content" not in plain["choices"][0]["message"] and "completion_tokens_details" not in plain["usage"]

    legacy = response_line("d", COMPLETIONS, [{**sample("d", 0, "t5t6t7", url=COMPLETIONS, tokens=3), **kept}],
                           7, "/m", "fp", 1, fake_token)  # fmt: skip
    logprobs = Completion.model_validate(legacy["response"]["body"]).choices[0].logprobs
    assert logprobs.tokens == ["t5", "t6", "t7"] and logprobs.token_logprobs == [-0.1, -0.2, -9999.0]
    assert logprobs.top_logprobs == [{"t5": -0.1, "t9": -2.5}, {"t6": -0.2}, {"t7": -0.3}]
    assert logprobs.text_offset == [0, 2, 4]


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
