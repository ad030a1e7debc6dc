"""What an OpenAI batch line may ask beyond sampling, through a whole job on each engine:
structured output (response_format, vLLM's structured_outputs) and logprobs, and a thinking
model's reasoning_content, answered in the providers' shape (the openai package's own types
parse every line)."""

from __future__ import annotations

import json
import re
from importlib.util import find_spec

import jsonschema
import pytest
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.ray.conftest import read_output
from tests.ray.test_openai_batch import CHAT, COMPLETIONS, batch_job, request
from tests.tiny_model import THINKING_ANSWERS

pytestmark = pytest.mark.ray

ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"],
          "additionalProperties": False}  # fmt: skip
LINES = [
    request("schema", CHAT, max_tokens=24, response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": SCHEMA}}),
    request("choice", CHAT, max_tokens=8, structured_outputs={"choice": ["red", "green"]}),
    request("regex", COMPLETIONS, max_tokens=8, structured_outputs={"regex": "[a-z]{3}"}),
    request("top3", CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3),
    request("legacy", COMPLETIONS, max_tokens=6, temperature=0, logprobs=2),
    request("plain", CHAT, max_tokens=6),
    request("xml", CHAT, response_format={"type": "xml"}),
]  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_structured_and_logprob_lines_are_answered_as_the_providers_do(ray_cluster, tiny_model, tmp_path, engine):
    record = run_job(spec_from_dict(batch_job(tmp_path, LINES, tiny_model, engine)), progress=False)

    assert record.state == "succeeded" and record.model["replica"]["engine"] == engine
    out = read_output(str(tmp_path / "out"))
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in out.read_bytes("output.jsonl").decode().splitlines()}
    failures = [json.loads(x) for x in out.read_bytes("errors.jsonl").decode().splitlines()]
    assert sorted(lines) == ["choice", "legacy", "plain", "regex", "schema", "top3"]
    rows = {r["custom_id"]: r for r in out.data}

    def chat(custom_id: str):
        return ChatCompletion.model_validate(lines[custom_id]["response"]["body"]).choices[0]

    def completion(custom_id: str):
        return Completion.model_validate(lines[custom_id]["response"]["body"]).choices[0]

    jsonschema.validate(json.loads(chat("schema").message.content), SCHEMA)
    assert (rows["schema"]["structured"], rows["schema"]["json_parsed"]) == ("json_schema", True)
    assert chat("choice").message.content in ("red", "green") and rows["choice"]["structured"] == "choice"
    assert re.fullmatch("[a-z]{3}", completion("regex").text)
    assert rows["plain"]["structured"] is None and rows["plain"]["token_logprobs"] is None

    top3 = chat("top3").logprobs.content
    assert len(top3) == rows["top3"]["completion_tokens"] > 0
    assert [t.logprob for t in top3] == pytest.approx(rows["top3"]["token_logprobs"])
    for token in top3:  # greedy: the chosen token is the most likely one
        assert 0 < len(token.top_logprobs) <= 3 and token.top_logprobs[0].token == token.token
        assert [e.logprob for e in token.top_logprobs] == sorted((e.logprob for e in token.top_logprobs), reverse=True)
    assert "".join(t.token for t in top3) == chat("top3").message.content
    legacy = completion("legacy").logprobs
    assert len(legacy.tokens) == rows["legacy"]["completion_tokens"] and all(len(t) <= 2 for t in legacy.top_logprobs)
    assert chat("plain").logprobs is None and chat("schema").logprobs is None

    [xml] = failures
    assert xml["custom_id"] == "xml" and BatchError.model_validate(xml["error"]).code == "bad_request"
    assert "body.response_format.type 'xml' is not supported" in xml["error"]["message"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_thinking_models_answers_carry_reasoning_content(ray_cluster, thinking_model, tmp_path, engine):
    (poem, (poem_thinking, poem_answer)), (count, (count_thinking, count_answer)) = THINKING_ANSWERS.items()
    lines = [
        request("poem", CHAT, temperature=0, max_tokens=24, messages=[{"role": "user", "content": poem}]),
        request("count", CHAT, temperature=0, max_tokens=24, logprobs=True, top_logprobs=2,
                messages=[{"role": "user", "content": count}]),
    ]  # fmt: skip
    data = batch_job(tmp_path, lines, thinking_model, engine)
    data["generation"]["reasoning"] = "auto"
    record = run_job(spec_from_dict(data), progress=False)

    assert record.state == "succeeded"
    out = read_output(str(tmp_path / "out"))
    bodies = {json.loads(x)["custom_id"]: json.loads(x)["response"]["body"] for x in out.read_bytes("output.jsonl").decode().splitlines()}
    rows = {r["custom_id"]: r for r in out.data}
    for custom_id, thinking, answer in (("poem", poem_thinking, poem_answer), ("count", count_thinking, count_answer)):
        body = ChatCompletion.model_validate(bodies[custom_id])
        message = body.choices[0].message
        assert (message.reasoning_content, message.content) == (thinking, answer) == (rows[custom_id]["reasoning"], rows[custom_id]["text"])
        assert body.usage.completion_tokens_details.reasoning_tokens == rows[custom_id]["reasoning_tokens"] > 0
    # The answer's tokens only: the thinking's (and its end tag) are not in logprobs, as the providers do.
    content = ChatCompletion.model_validate(bodies["count"]).choices[0].logprobs.content
    assert len(content) == rows["count"]["completion_tokens"] - rows["count"]["reasoning_tokens"]
    assert "".join(t.token for t in content) == count_answer
    assert ChatCompletion.model_validate(bodies["poem"]).choices[0].logprobs is None
