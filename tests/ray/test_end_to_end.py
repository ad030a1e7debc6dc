"""Whole jobs on a real local Ray cluster with a tiny real model."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from jobs.driver import run_job
from jobs.output import OutputConflict
from jobs.record import library_versions
from jobs.core.spec import spec_from_dict
from tests.conftest import job_dict, write_prompts
from tests.ray.conftest import assert_exactly_once, assert_finished_layout, read_output

pytestmark = pytest.mark.ray


def _two_files(root) -> dict[str, dict]:
    """Two input files (one in a subdirectory); returns input rows by both of their ids."""
    write_prompts(root / "a.parquet", 25, start=0)
    write_prompts(root / "sub" / "b.parquet", 20, start=25)
    rows = {}
    for rel in ("a.parquet", "sub/b.parquet"):
        for i, row in enumerate(pq.read_table(root / rel).to_pylist()):
            rows[row["id"]] = row
            rows[f"{rel}:{i}"] = row
    return rows


@pytest.mark.parametrize("id_column", ["id", None], ids=["explicit-ids", "derived-ids"])
def test_sampled_job_two_replicas_is_exactly_once(ray_cluster, tiny_model, tmp_path, id_column):
    rows = _two_files(tmp_path / "in")
    out_dir = tmp_path / "out"
    data = job_dict(
        str(tmp_path / "in"),
        str(out_dir),
        tiny_model,
        input={"id_column": id_column, "pass_through": ["topic", "style"]},
        generation={"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 3, "seed": 1234, "top_k": 50},
        resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
    )
    spec = spec_from_dict(data)

    record = run_job(spec, progress=False)

    if id_column:
        expected_ids = [f"row-{i:05d}" for i in range(45)]
    else:
        expected_ids = [f"a.parquet:{i}" for i in range(25)] + [f"sub/b.parquet:{i}" for i in range(20)]
    out = assert_exactly_once(str(out_dir), {}, expected_ids, n=3, id_column=id_column or "id")
    # a.parquet: 10+10+5 rows, sub/b.parquet: 10+10 rows -> five shards, 45 * 3 rows
    assert_finished_layout(out, shards=5, rows_total=135)
    assert record.state == "succeeded"
    assert out.record["fingerprint"] == spec.fingerprint() == record.fingerprint
    assert out.record["counts"]["input_rows"] == 45

    for row in out.data:
        source = rows[row[id_column or "id"]]
        assert (row["topic"], row["style"]) == (source["topic"], source["style"]), row
        assert row["finish_reason"] in ("stop", "length")
        assert 0 <= row["completion_tokens"] <= 8
        assert row["prompt_tokens"] > 0
        assert isinstance(row["text"], str)
    # Sampling really sampled: the three samples of a row are not all one text everywhere.
    by_id: dict = {}
    for row in out.data:
        by_id.setdefault(row[id_column or "id"], set()).add(row["text"])
    assert any(len(texts) > 1 for texts in by_id.values())

    versions = library_versions()
    assert out.metadata and set(out.metadata) == {f for f in out.files if f.startswith("data/")}
    for rel, raw in out.metadata.items():
        assert raw is not None, f"{rel} has no b'bulkgen' schema metadata"
        facts = json.loads(raw)
        assert facts["fingerprint"] == spec.fingerprint()
        gen = facts["generation"]
        assert gen["seed"] == 1234 and gen["num_return_sequences"] == 3 and gen["do_sample"] is True
        assert gen["max_new_tokens"] == 8 and gen["top_k"] == 50
        model = facts["model"]
        assert model["path"] == str(tiny_model)
        assert len(model["weights_sha256"]) == 64 and int(model["weights_sha256"], 16) >= 0
        # _job.json holds the same identity (plus facts learnt while running, e.g. the replica's device).
        assert {k: out.record["model"].get(k) for k in model} == model
        for dist in ("torch", "transformers", "ray", "pyarrow", "fsspec", "python"):
            assert facts["versions"][dist] == versions[dist]
        # The engine that ran, as the replica reported it to the record too.
        assert facts["engine"] == out.record["model"]["replica"]["engine"] == "transformers"
        assert facts["engine_version"] == versions["transformers"]


# -- token counts and finish reasons are true to the text --------------------------------


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model, tmp_path_factory):
    """The tiny checkpoint with its eos row of lm_head made a copy of a token greedy decoding
    often picks, so some greedy completions end on eos and others run to the length limit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-llama-eos"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # (V, H)
        weight[tok.eos_token_id] = weight[262] * 1.01
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_greedy_counts_and_finish_reasons_match_transformers(ray_cluster, eos_prone_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_new = 12
    write_prompts(tmp_path / "in.parquet", 40)
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in.parquet"),
            str(tmp_path / "out"),
            eos_prone_model,
            generation={"max_new_tokens": max_new},
            output={"include_prompt": True},
            resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
        )
    )
    run_job(spec, progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, [f"row-{i:05d}" for i in range(40)], n=1)
    assert_finished_layout(out, shards=4, rows_total=40)

    tok = AutoTokenizer.from_pretrained(eos_prone_model)
    model = AutoModelForCausalLM.from_pretrained(eos_prone_model).eval()
    eos = tok.eos_token_id
    prompts = {r["id"]: r["prompt"] for r in pq.read_table(tmp_path / "in.parquet").to_pylist()}
    reasons = []
    for row in out.data:
        prompt = prompts[row["id"]]
        assert row["prompt"] == prompt
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=eos)
        new = generated[0, enc.input_ids.shape[1] :].tolist()
        hit_eos = eos in new
        tokens = new[: new.index(eos)] if hit_eos else new
        expected_reason = "length" if len(tokens) == max_new and not hit_eos else "stop"
        assert row["prompt_tokens"] == len(tok(prompt).input_ids), row["id"]
        assert row["completion_tokens"] == len(tokens), (row["id"], row["text"], tokens)
        assert row["text"] == tok.decode(tokens, skip_special_tokens=True), row["id"]
        assert row["finish_reason"] == expected_reason, (row["id"], new)
        reasons.append(expected_reason)
    # The checkpoint must exercise both ends, or this test checks only one of them.
    assert {"stop", "length"} <= set(reasons), reasons


# -- prompt templates and chat messages ---------------------------------------------------------


def test_prompt_template_job(ray_cluster, tiny_model, tmp_path):
    write_prompts(tmp_path / "in.parquet", 24)
    template = "Write a {style} note about {topic}"
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in.parquet"),
            str(tmp_path / "out"),
            tiny_model,
            input={"prompt_column": None, "prompt_template": template, "pass_through": ["topic"]},
            generation={"max_new_tokens": 6},
            output={"include_prompt": True},
            resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
        )
    )
    run_job(spec, progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, [f"row-{i:05d}" for i in range(24)], n=1)
    assert_finished_layout(out, shards=3, rows_total=24)
    source = {r["id"]: r for r in pq.read_table(tmp_path / "in.parquet").to_pylist()}
    for row in out.data:
        src = source[row["id"]]
        assert row["prompt"] == f"Write a {src['style']} note about {src['topic']}"
        assert row["topic"] == src["topic"]


def test_logprobs_job(ray_cluster, tiny_model, tmp_path):
    write_prompts(tmp_path / "in.parquet", 12)
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "in.parquet"),
            str(tmp_path / "out"),
            tiny_model,
            generation={"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 2, "logprobs": True,
                        "top_logprobs": 3},
            resources={"replicas": 1, "batch_size": 8, "num_cpus": 1},
        )  # fmt: skip
    )
    run_job(spec, progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, [f"row-{i:05d}" for i in range(12)], n=2)
    schema = pq.read_schema(tmp_path / "out" / "data" / "part-00000.parquet")
    documented = [  # README, "Log-probabilities"
        ("token_ids", pa.list_(pa.int32())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("top_logprobs", pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))),
        ("logprob_sum", pa.float64()),
    ]
    assert [(f.name, f.type) for f in schema][6:10] == documented
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in out.data:
        tokens, chosen = row["token_ids"], row["token_logprobs"]
        assert len(tokens) == len(chosen) == len(row["top_logprobs"]) == row["completion_tokens"]
        assert tokenizer.decode(tokens, skip_special_tokens=True) == row["text"]
        assert row["logprob_sum"] == math.fsum(chosen) and all(p <= 0 for p in chosen)
        for token, logprob, top in zip(tokens, chosen, row["top_logprobs"]):
            values = [entry["logprob"] for entry in top]
            assert len(top) == 3 and values == sorted(values, reverse=True)
            # Sampled, the chosen token is listed exactly when it is among the 3 most likely.
            assert (token in {entry["token_id"] for entry in top}) == (logprob >= values[-1])


def _write_chats(path, n: int) -> list[dict]:
    topics = ["the sea", "sockets", "timeouts", "lists"]
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Tell me about {topics[i % 4]} ({i})"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        if i % 5 == 0:
            messages += [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More, please."}]
        rows.append({"id": f"chat-{i:03d}", "messages": messages, "topic": topics[i % 4]})
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("messages", pa.list_(message)), ("topic", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return rows


def test_chat_messages_job(ray_cluster, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    chats = {r["id"]: r for r in _write_chats(tmp_path / "chats.parquet", 20)}
    spec = spec_from_dict(
        job_dict(
            str(tmp_path / "chats.parquet"),
            str(tmp_path / "out"),
            tiny_model,
            input={"prompt_column": None, "messages_column": "messages", "pass_through": ["topic"]},
            generation={"max_new_tokens": 6},
            output={"include_prompt": True},
            resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
        )
    )
    run_job(spec, progress=False)
    out = assert_exactly_once(str(tmp_path / "out"), {}, list(chats), n=1)
    assert_finished_layout(out, shards=2, rows_total=20)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row in out.data:
        expected = tok.apply_chat_template(chats[row["id"]]["messages"], tokenize=False, add_generation_prompt=True)
        assert row["prompt"] == expected
        assert row["prompt"].endswith("assistant:")
        # The chat template wrote the special tokens it wants: none are added again.
        assert row["prompt_tokens"] == len(tok(expected, add_special_tokens=False).input_ids)
        assert row["topic"] == chats[row["id"]]["topic"]


# -- re-running into a used output ---------------------------------------------------------------


def test_rerun_is_noop_and_other_spec_conflicts(ray_cluster, tiny_model, tmp_path):
    write_prompts(tmp_path / "in.parquet", 30)
    out_dir = tmp_path / "out"
    data = job_dict(
        str(tmp_path / "in.parquet"),
        str(out_dir),
        tiny_model,
        generation={"max_new_tokens": 8},
        resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
    )
    first = run_job(spec_from_dict(data), progress=False)
    assert first.state == "succeeded"
    ids = [f"row-{i:05d}" for i in range(30)]
    before = assert_exactly_once(str(out_dir), {}, ids, n=1)
    committed = [f for f in before.files if f.startswith(("data/", "_commits/"))]
    mtimes = {f: os.stat(out_dir / f).st_mtime_ns for f in committed}
    contents = {f: (out_dir / f).read_bytes() for f in committed}

    again = run_job(spec_from_dict(data), progress=False)
    assert again.state == "succeeded"
    after = assert_exactly_once(str(out_dir), {}, ids, n=1)
    assert_finished_layout(after, shards=3, rows_total=30)
    assert {f: os.stat(out_dir / f).st_mtime_ns for f in committed} == mtimes
    assert {f: (out_dir / f).read_bytes() for f in committed} == contents
    assert after.record["counts"]["shards_retried"] == 0
    assert len(after.record["runs"]) == 2

    other = job_dict(
        str(tmp_path / "in.parquet"),
        str(out_dir),
        tiny_model,
        generation={"max_new_tokens": 4},
        resources={"replicas": 2, "batch_size": 8, "num_cpus": 1},
        shards={"rows_per_shard": 15},
    )
    with pytest.raises(OutputConflict, match=str(out_dir)):
        run_job(spec_from_dict(other), progress=False)
    # Refused before touching anything.
    assert {f: (out_dir / f).read_bytes() for f in committed} == contents
    assert read_output(str(out_dir)).record["fingerprint"] == spec_from_dict(data).fingerprint()

    replaced = run_job(spec_from_dict(other), overwrite=True, progress=False)
    assert replaced.state == "succeeded"
    out = assert_exactly_once(str(out_dir), {}, ids, n=1)
    # Two shards of 15 now: the first job's part-00002 must be gone.
    assert_finished_layout(out, shards=2, rows_total=30)
    assert out.record["fingerprint"] == spec_from_dict(other).fingerprint()
    assert out.record["spec"]["generation"]["max_new_tokens"] == 4
    assert all(r["completion_tokens"] <= 4 for r in out.data)
    assert len(out.record["runs"]) == 1

