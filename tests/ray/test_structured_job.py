"""Structured output in whole jobs through Ray, on both engines: every data/ row satisfies its
constraint (the job's, or its row's own schema), and a row that could not is a dead letter that
says why, never a row of data/. (Refusals before the job starts: tests/jobs/test_bad_input.py.)"""

from __future__ import annotations

import json
import re
from importlib.util import find_spec

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import job_dict, write_prompts
from tests.ray.conftest import assert_exactly_once

pytestmark = pytest.mark.ray

ENGINES = [
    "transformers",
    pytest.param("vllm", marks=pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")),
]
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["label", "n"],
    "additionalProperties": False,
}
ROW_SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
]
TOO_LONG = {"type": "string", "minLength": 80}  # cannot be whole within max_new_tokens
MAX_NEW = 32
# Per row: null takes the job's schema.
SCHEMAS = [None, None, None, ROW_SCHEMAS[0], ROW_SCHEMAS[1], TOO_LONG]


def structured_job(tmp_path, model, engine: str, structured: dict, schemas: list | None = None, **sections) -> dict:
    path = write_prompts(tmp_path / "in" / "p.parquet", len(schemas or SCHEMAS))
    if schemas is not None:
        texts = pa.array([s and json.dumps(s) for s in schemas], pa.string())
        pq.write_table(pq.read_table(path).append_column("schema", texts), path)
    data = job_dict(
        str(tmp_path / "in"), str(tmp_path / "out"), model,
        generation={"max_new_tokens": MAX_NEW, "structured": structured}, **sections,
    )  # fmt: skip
    data["model"]["engine"] = engine
    if engine == "vllm":
        data["model"]["engine_options"] = {"enforce_eager": True}
    if schemas is not None:
        data["input"]["schema_column"] = "schema"
    return data


@pytest.mark.parametrize("engine", ENGINES)
def test_json_schema_job_with_per_row_schemas(ray_cluster, tiny_model, tmp_path, engine):
    data = structured_job(tmp_path, tiny_model, engine, {"json_schema": SCHEMA}, SCHEMAS,
                          shards={"max_failed_fraction": 0.2})  # fmt: skip
    record = run_job(spec_from_dict(data), progress=False)
    assert record.state == "succeeded" and record.model["replica"]["engine"] == engine
    ids = [f"row-{i:05d}" for i in range(len(SCHEMAS))]
    out = assert_exactly_once(str(tmp_path / "out"), None, ids, n=1, allow_errors=True)

    schema_of = dict(zip(ids, SCHEMAS))
    assert sorted(r["id"] for r in out.data) == ids[:5]
    for row in out.data:
        jsonschema.validate(json.loads(row["text"]), schema_of[row["id"]] or SCHEMA)
        assert (row["structured"], row["json_parsed"]) == ("json_schema", True)
    [dead] = out.errors
    assert (dead["id"], dead["error_code"]) == (ids[5], "structured_incomplete")
    assert dead["error"].startswith(f"max_new_tokens {MAX_NEW} reached before the completion satisfied its JSON schema")
    assert json.loads(dead["schema"]) == TOO_LONG  # its row, to generate again with a larger limit
    assert record.counts.rows_failed == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "structured, satisfied",
    [
        ({"choices": ["yes", "no", "maybe so"]}, lambda text: text in ("yes", "no", "maybe so")),
        ({"regex": "[a-z]{3}-[0-9]{2}"}, lambda text: re.fullmatch("[a-z]{3}-[0-9]{2}", text)),
    ],
    ids=["choices", "regex"],
)
def test_choices_and_regex_jobs(ray_cluster, tiny_model, tmp_path, engine, structured, satisfied):
    data = structured_job(tmp_path, tiny_model, engine, structured)
    data["generation"] = {**data["generation"], "do_sample": True, "num_return_sequences": 2}
    assert run_job(spec_from_dict(data), progress=False).state == "succeeded"
    out = assert_exactly_once(str(tmp_path / "out"), None, [f"row-{i:05d}" for i in range(len(SCHEMAS))], n=2)
    kind = "choice" if "choices" in structured else "regex"
    for row in out.data:
        assert satisfied(row["text"]), row
        assert (row["structured"], row["json_parsed"]) == (kind, None)
