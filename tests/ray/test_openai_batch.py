"""An OpenAI batch file as a job: chat and completion requests with their own n, max_tokens, stop and
temperature, a malformed line and a duplicate custom_id; output.jsonl and errors.jsonl read back with
the `openai` package's own types. Also the engines' per-request sampling, without Ray."""

from __future__ import annotations

import codecs
import json
from collections import Counter
from importlib.util import find_spec

import pytest
import torch
from openai.types import BatchError, BatchRequestCounts, Completion
from openai.types.chat import ChatCompletion
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import cli
from jobs.core.errors import InputError
from jobs.core.spec import spec_from_dict
from jobs.driver import JobError, run_job
from jobs.validate import validate
from tests.conftest import job_dict
from tests.ray.conftest import read_output
from workers.engine import Request, SamplingParams, generate
from workers.transformers_engine import TransformersEngine

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def request(custom_id: str, url: str, **body) -> str:
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"Write a short poem about {custom_id}"}])
    else:
        body.setdefault("prompt", f"The quick brown fox {custom_id}")
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "any", **body}})


LINES = [
    request("chat-n2", CHAT, n=2, max_tokens=4, temperature=1.2),
    request("cmpl-n2", COMPLETIONS, n=2, max_tokens=6, stop=["e"]),
    request("chat-stop", CHAT, stop=["a", "o"], max_completion_tokens=10),
    "",  # skipped, as vLLM's run-batch skips it; line numbers still count it
    request("cmpl-default", COMPLETIONS),
    json.dumps({"custom_id": "bad-body", "method": "POST", "url": CHAT, "body": {"prompt": "chat needs messages"}}),
    '{"custom_id": "not json',
    request("greedy-1", CHAT, temperature=0, messages=[{"role": "user", "content": "Return the number"}]),
    request("greedy-2", CHAT, temperature=0, messages=[{"role": "user", "content": "Return the number"}]),
]
SAMPLES = {"chat-n2": 2, "cmpl-n2": 2, "chat-stop": 1, "cmpl-default": 1, "greedy-1": 1, "greedy-2": 1}
FAILED = {"bad-body": 6, None: 7}  # custom_id (None: unreadable) -> line number


def batch_job(tmp_path, lines: list[str], model, engine: str) -> dict:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(text + "\n" for text in lines))
    data = job_dict(
        str(path), str(tmp_path / "out"), model,
        generation={"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "seed": 3},
        shards={"rows_per_shard": 3, "max_failed_fraction": 0.5},
        output={"format": "openai-batch"},
    )  # fmt: skip
    data["input"] = {"uri": str(path)}  # format and ids inferred: openai-batch, custom_id
    data["model"]["engine"] = engine
    if engine == "vllm":
        data["model"]["engine_options"] = {"enforce_eager": True}  # seconds to start, not a compile
    return data


ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]


@pytest.mark.ray
@pytest.mark.parametrize("engine", ENGINES)
def test_batch_file_job_writes_provider_shaped_output(ray_cluster, tiny_model, tmp_path, capsys, engine):
    duplicate = request("chat-n2", COMPLETIONS)
    with pytest.raises(InputError, match=r"custom_id 'chat-n2' is not unique: it is on lines 1 and 10 of "):
        validate(spec_from_dict(batch_job(tmp_path, [*LINES, duplicate], tiny_model, engine)))

    data = batch_job(tmp_path, LINES, tiny_model, engine)  # fixed: the duplicate dropped
    record = run_job(spec_from_dict(data), progress=False)

    assert record.state == "succeeded"
    assert record.model["replica"]["engine"] == engine
    assert record.counts.input_rows == 8  # non-blank lines
    assert record.counts.rows_total == sum(SAMPLES.values()) + len(FAILED)  # each request's own n
    out = read_output(str(tmp_path / "out"))
    assert {"output.jsonl", "errors.jsonl", "_SUCCESS"} <= set(out.files)
    responses = [json.loads(x) for x in out.read_bytes("output.jsonl").decode().splitlines()]
    failures = [json.loads(x) for x in out.read_bytes("errors.jsonl").decode().splitlines()]

    # Every request exactly once, in output or errors, in input order.
    assert [r["custom_id"] for r in responses] == list(SAMPLES)
    assert [f["custom_id"] for f in failures] == list(FAILED)
    assert len({r["id"] for r in responses + failures}) == len(responses) + len(failures)

    # Parquet output carries the same rows: every (custom_id, sample_index) once across data/ and errors/.
    keys = Counter((r["custom_id"], r["sample_index"]) for r in out.data + out.errors)
    assert set(keys.values()) == {1}
    assert {k for k in keys if k[0] in SAMPLES} == {(c, s) for c, n in SAMPLES.items() for s in range(n)}
    by_id: dict = {}
    for row in sorted(out.data, key=lambda r: r["sample_index"]):
        by_id.setdefault(row["custom_id"], []).append(row)

    for line in responses:
        custom_id, response = line["custom_id"], line["response"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert response["status_code"] == 200 and response["request_id"]
        chat = custom_id.startswith(("chat", "greedy"))
        body = (ChatCompletion if chat else Completion).model_validate(response["body"])
        texts = [c.message.content if chat else c.text for c in body.choices]
        rows = by_id[custom_id]
        assert [c.index for c in body.choices] == list(range(SAMPLES[custom_id]))
        assert texts == [r["text"] for r in rows]
        assert [c.finish_reason for c in body.choices] == [r["finish_reason"] for r in rows]
        assert body.usage.prompt_tokens == rows[0]["prompt_tokens"]
        assert body.usage.completion_tokens == sum(r["completion_tokens"] for r in rows)
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens

    # Per-request settings over the spec's: max_tokens, stop, temperature 0.
    limits = {"chat-n2": 4, "cmpl-n2": 6, "chat-stop": 10, "cmpl-default": 8}
    for custom_id, limit in limits.items():
        for row in by_id[custom_id]:
            assert row["completion_tokens"] <= limit, row
            assert row["finish_reason"] == "stop" or row["completion_tokens"] == limit, row
    assert max(r["completion_tokens"] for r in by_id["chat-stop"] + by_id["cmpl-default"]) > 4  # not all capped at 4
    assert not any("e" in r["text"] for r in by_id["cmpl-n2"])
    assert not any(s in r["text"] for r in by_id["chat-stop"] for s in "ao")
    assert by_id["greedy-1"][0]["text"] == by_id["greedy-2"][0]["text"]  # greedy: the seed no longer matters

    # Malformed lines: dead letters naming their line, not a failed job.
    for line, (custom_id, number) in zip(failures, FAILED.items()):
        assert line["response"] is None
        error = BatchError.model_validate(line["error"])
        assert (error.code, error.line) == ("bad_request", number)
        assert error.message.startswith(f"line {number}: ")
    assert "body.messages is missing" in failures[0]["error"]["message"]
    assert "not JSON" in failures[1]["error"]["message"]

    # bulkgen status --json: the providers' request counts.
    capsys.readouterr()
    assert cli.main(["status", str(tmp_path / "out"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["request_counts"]
    assert BatchRequestCounts.model_validate(counts).model_dump() == {"total": 8, "completed": 6, "failed": 2}


def with_body(line: str, fields: str) -> str:
    """`line` with `fields` (raw JSON text, so it can hold what json.dumps would not write) first in its body."""
    return line.replace('"body": {', '"body": {' + fields + ", ", 1)


# Line 1 follows a UTF-8 BOM; lines 2 and 3 hold numbers JSON does not have; line 4 is cut short.
BAD_LINES = [
    request("bom", COMPLETIONS, max_tokens=3),
    with_body(request("nan", CHAT), '"temperature": NaN'),
    with_body(request("inf", COMPLETIONS), '"max_tokens": 4, "top_p": -Infinity'),
    '{"custom_id": "cut',
    request("ok", CHAT, max_tokens=3),
]


def files_and_counts(out_uri: str, capsys) -> tuple[list, list, int, dict]:
    """(output.jsonl's custom_ids, errors.jsonl's (custom_id, line, message)), `status --json`'s exit code
    and request_counts."""
    out = read_output(out_uri)
    responses = [json.loads(x)["custom_id"] for x in out.read_bytes("output.jsonl").decode().splitlines()]
    failures = [json.loads(x) for x in out.read_bytes("errors.jsonl").decode().splitlines()]
    capsys.readouterr()
    code = cli.main(["status", out_uri, "--json"])
    counts = json.loads(capsys.readouterr().out)["request_counts"]
    return responses, [(f["custom_id"], f["error"]["line"], f["error"]["message"]) for f in failures], code, counts


@pytest.mark.ray
def test_a_batch_with_bad_lines_ends_like_a_providers(ray_cluster, tiny_model, tmp_path, capsys):
    """Over its error budget a batch job still ends with output.jsonl and errors.jsonl, and request_counts agrees
    with them; a batch input's default budget lets every line fail, as a provider's batch does."""
    data = batch_job(tmp_path, BAD_LINES, tiny_model, "transformers")
    path = tmp_path / "batch.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    data["shards"] = {"rows_per_shard": 3, "max_failed_fraction": 0.0}
    out_uri = str(tmp_path / "out")

    with pytest.raises(JobError, match=r"3 of 5 rows failed .* over the error budget"):
        run_job(spec_from_dict(data), progress=False)
    out = read_output(out_uri)
    assert out.record["state"] == "failed" and "_SUCCESS" not in out.files
    responses, failures, code, counts = files_and_counts(out_uri, capsys)
    assert responses == ["bom", "ok"]  # the BOM is no part of line 1's request
    assert [f[:2] for f in failures] == [("nan", 2), ("inf", 3), (None, 4)]
    assert "NaN is not a JSON number" in failures[0][2] and "-Infinity is not a JSON number" in failures[1][2]
    assert code == cli.EXIT_FAILED
    assert counts == {"total": 5, "completed": len(responses), "failed": len(failures)}

    # The same job with the batch input's default budget: it succeeds from the committed shards.
    del data["shards"]["max_failed_fraction"]
    record = run_job(spec_from_dict(data), progress=False)
    assert record.state == "succeeded" and record.counts.rows_failed == 3
    assert files_and_counts(out_uri, capsys) == (responses, failures, 0, counts)


# -- the engines' per-request sampling (no Ray) --------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread
    yield model, AutoTokenizer.from_pretrained(tiny_model)
    torch.set_num_threads(threads)


def engine(lm, **params) -> TransformersEngine:
    model, tokenizer = lm
    return TransformersEngine(model, tokenizer, SamplingParams(max_new_tokens=12, **params), 8, 100_000)


def texts(lm, requests, **params) -> list[str]:
    return [c.text for c in generate(engine(lm, **params), requests)]


PROMPTS = ["Write a short poem", "The quick brown fox jumps over the lazy dog.", "Raise ValueError if"]


def test_a_request_with_its_own_params_samples_as_a_job_with_them(lm):
    ids = [tuple(lm[1](p).input_ids) for p in PROMPTS]
    hot = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, top_k=40)
    alone_greedy = texts(lm, [Request(i, p, 5 + i, 12) for i, p in enumerate(ids)])
    alone_hot = texts(lm, [Request(i, p, 5 + i, 12) for i, p in enumerate(ids)], **{
        k: getattr(hot, k) for k in ("do_sample", "temperature", "top_p", "top_k")})  # fmt: skip
    assert alone_hot != alone_greedy  # the control: the parameters matter
    # One batch, mixed: every other request brings its own parameters; each row comes out as it would alone.
    mixed = [Request(i, p, 5 + i, 12, hot if i % 2 else None) for i, p in enumerate(ids)]
    assert texts(lm, mixed) == [alone_hot[i] if i % 2 else alone_greedy[i] for i in range(len(ids))]


def test_a_request_with_its_own_stop_strings(lm):
    ids = tuple(lm[1](PROMPTS[1]).input_ids)
    (free,) = texts(lm, [Request(0, ids, 1, 12)])
    # A character of what the row says when nothing stops it (ASCII: whole in any decoded tail).
    stop = next(ch for ch in free[1:] if ch.isascii() and ch.isalnum())
    own = SamplingParams(max_new_tokens=12, stop=(stop,))
    completions = generate(engine(lm), [Request(0, ids, 1, 12, own), Request(1, ids, 1, 12)])
    assert completions[0].text == free[: free.find(stop)] and completions[0].finish_reason == "stop"
    assert completions[1].text == free  # its neighbour keeps the job's (no) stop strings
