"""generation.reasoning through a whole job on each engine: the tiny model that thinks
(tests/tiny_model.py's save_thinking_model) answers with its thinking in the reasoning
column and the answer alone, without tags, in text."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import job_dict
from tests.ray.conftest import assert_exactly_once, assert_finished_layout
from tests.tiny_model import THINKING_ANSWERS

pytestmark = pytest.mark.ray

ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_thinking_goes_to_its_column_and_the_answer_to_text(ray_cluster, thinking_model, tmp_path, engine):
    ids = ["poem", "count"]
    messages = [[{"role": "user", "content": prompt}] for prompt in THINKING_ANSWERS]
    pq.write_table(pa.table({"id": ids, "messages": messages}), tmp_path / "chat.parquet")
    data = job_dict(
        str(tmp_path / "chat.parquet"), str(tmp_path / "out"), thinking_model,
        generation={"max_new_tokens": 24, "reasoning": "auto"}, shards={"rows_per_shard": 1},
    )  # fmt: skip
    data["input"] = {"uri": str(tmp_path / "chat.parquet"), "messages_column": "messages", "id_column": "id"}
    data["model"]["engine"] = engine
    if engine == "vllm":
        data["model"]["engine_options"] = {"enforce_eager": True}  # seconds to start, not a compile

    record = run_job(spec_from_dict(data), progress=False)

    assert record.model["replica"]["engine"] == engine
    out = assert_exactly_once(str(tmp_path / "out"), None, ids, n=1)
    assert_finished_layout(out, shards=2, rows_total=2)
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    rows = {r["id"]: r for r in out.data}
    for row_id, (thinking, answer) in zip(ids, THINKING_ANSWERS.values()):
        row = rows[row_id]
        assert (row["reasoning"], row["text"], row["finish_reason"]) == (thinking, answer, "stop"), row
        assert row["reasoning_tokens"] == tokens(f"{thinking}</think>")
        assert row["completion_tokens"] == tokens(f"{thinking}</think>{answer}")  # OpenAI counts the thinking too
    assert record.counts.reasoning_tokens == out.record["counts"]["reasoning_tokens"]
    assert record.counts.reasoning_tokens == sum(r["reasoning_tokens"] for r in out.data)
    commits = [json.loads(out.read_bytes(f)) for f in out.files if f.startswith("_commits/")]
    assert sorted(c["reasoning_tokens"] for c in commits) == sorted(r["reasoning_tokens"] for r in out.data)
