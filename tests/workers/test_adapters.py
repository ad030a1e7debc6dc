"""LoRA adapters on the transformers engine (PEFT's mixed-adapter batches), and the stage that
chooses each row's adapter. In-process, on the tiny Llama and the adapters trained for the session
(tests/conftest.py lora_adapters)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jobs.core.plan import plan
from jobs.core.prompts import UNKNOWN_ADAPTER
from jobs.core.protocol import ShardTask
from jobs.core.spec import spec_from_dict
from jobs.dataset import open_dataset
from tests.conftest import job_dict, write_prompts
from tests.workers.conftest import configured_replica, shard_result
from workers.engine import Request, generate
from workers.stages.adapter import ChooseAdapter
from workers.stages.work import Prompt, ShardWork
from workers.transformers_engine import TransformersEngine

PROMPTS = ["Write a short poem", "The quick brown fox", "Create a new socket using"]
MAX_NEW = 12


def adapter_spec(tmp_path, model, adapters: dict, **sections):
    """A job whose rows choose among `adapters` ({name: path}) by their `adapter` column."""
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model, **sections)
    data["model"]["adapters"] = {name: str(path) for name, path in adapters.items()}
    data["input"]["adapter_column"] = "adapter"
    return spec_from_dict(data)


@pytest.fixture(scope="module")
def engines(tiny_model, lora_adapters, tmp_path_factory):
    """(an engine holding both adapters, a plain engine) of the tiny Llama, one thread each."""
    threads = torch.get_num_threads()
    spec = adapter_spec(tmp_path_factory.mktemp("spec"), tiny_model, lora_adapters)
    plain = spec_from_dict(job_dict("/in", "/out", tiny_model))
    yield TransformersEngine.from_spec(spec), TransformersEngine.from_spec(plain)
    torch.set_num_threads(threads)


def peft_greedy(base_path, adapter_path, ids: list[int]) -> tuple[int, ...]:
    """PEFT's own generate with one adapter: the reference for that adapter's rows."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter_path)).eval()
    eos = model.generation_config.eos_token_id
    out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=eos)
    tokens = out[0, len(ids) :].tolist()
    return tuple(tokens[: tokens.index(eos)] if eos in tokens else tokens)


def test_one_batch_mixes_adapters_and_base_rows(engines, tiny_model, lora_adapters):
    with_adapters, plain = engines
    tok = plain.tokenizer
    ids = [tuple(tok(p).input_ids) for p in PROMPTS]
    names = [None, "poem", "code"]
    requests = [Request(len(names) * i + j, p, 0, MAX_NEW, adapter=name) for i, p in enumerate(ids) for j, name in enumerate(names)]
    with_adapters.batch_size = len(requests)  # every row in the one running batch
    got = {c.key: c.token_ids for c in generate(with_adapters, requests)}
    base = {c.key: c.token_ids for c in generate(plain, [Request(i, p, 0, MAX_NEW) for i, p in enumerate(ids)])}
    for r in requests:
        row = r.key // len(names)
        if r.adapter is None:
            assert got[r.key] == base[row], "a base row in a mixed batch is the plain model's"
        else:
            assert got[r.key] == peft_greedy(tiny_model, lora_adapters[r.adapter], list(r.prompt_ids)), r.adapter
            assert got[r.key] != base[row], f"{r.adapter} changes the text of row {row}"
    assert with_adapters.describe()["adapters"] == ["code", "poem"] and "adapters" not in plain.describe()


# -- the stage -------------------------------------------------------------------------------------


def work_of(rows: list[dict], samples: int = 2) -> ShardWork:
    """Rendered work: a prompt and `samples` requests per row."""
    work = ShardWork(None, rows=rows, ids=[f"r{i}" for i in range(len(rows))], samples=[range(samples)] * len(rows))
    prompts = {i: Prompt("p", [1, 2]) for i in range(len(rows))}
    requests = [Request(work.key(i, s), (1, 2), 0, 4) for i in range(len(rows)) for s in range(samples)]
    return ShardWork(None, rows=work.rows, ids=work.ids, samples=work.samples, prompts=prompts, requests=requests)


def test_rows_choose_their_adapter_by_column(tmp_path, tiny_model):
    spec = adapter_spec(tmp_path, tiny_model, {"poem": "/a", "code": "/b"})
    work = ChooseAdapter(spec).run(work_of([{"adapter": "code"}, {"adapter": None}, {"adapter": "poem"}]))
    assert [r.adapter for r in work.requests] == ["code", "code", None, None, "poem", "poem"]
    assert work.row_columns == {0: {"adapter": "code"}, 1: {"adapter": None}, 2: {"adapter": "poem"}}
    assert work.row_errors == {}


def test_a_name_that_is_no_adapter_is_the_rows_dead_letter(tmp_path, tiny_model):
    spec = adapter_spec(tmp_path, tiny_model, {"poem": "/a"})
    work = ChooseAdapter(spec).run(work_of([{"adapter": "poem"}, {"adapter": "peom"}]))
    assert [r.adapter for r in work.requests] == ["poem", "poem"]  # row 1 has no requests left
    assert work.row_errors[1].code == UNKNOWN_ADAPTER and "'peom' is not one of model.adapters ['poem']" in str(work.row_errors[1])
    assert 1 not in work.row_columns


def test_model_adapter_is_every_rows(tmp_path, tiny_model):
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
    data["model"]["adapter"] = "/a"
    work = ChooseAdapter(spec_from_dict(data)).run(work_of([{}, {}], samples=1))
    assert [r.adapter for r in work.requests] == ["default", "default"]


def test_a_batch_line_chooses_by_its_model(tmp_path, tiny_model):
    data = job_dict(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), tiny_model)
    data["input"] = {"uri": str(tmp_path / "in.jsonl")}
    data["model"]["adapters"] = {"poem": "/a"}
    lines = [{"custom_id": f"c{i}", "url": "/v1/completions", "body": {"model": model, "prompt": "Write"}}
             for i, model in enumerate(["poem", "gpt-4o-mini"])]  # fmt: skip
    rows = [{"request": json.dumps(line), "line": i + 1} for i, line in enumerate(lines)]
    work = ChooseAdapter(spec_from_dict(data)).run(work_of(rows, samples=1))
    assert [r.adapter for r in work.requests] == ["poem", None]  # any other model: the base model's name


def test_one_adapter_for_every_row_changes_every_row(tmp_path, tiny_model, lora_adapters, keep_torch_threads):
    write_prompts(tmp_path / "in" / "p.parquet", 4)
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
    plain = spec_from_dict(data)
    adapted = spec_from_dict({**data, "model": {**data["model"], "adapter": str(lora_adapters["poem"])}})
    [shard] = plan(open_dataset(plain.input).files, plain.shards.rows_per_shard)
    tables = [
        pq.read_table(shard_result(configured_replica(spec), ShardTask(shard, f"attempt-0-{i}")).staged["data"])
        for i, spec in enumerate((plain, adapted))
    ]
    base, with_adapter = (t.column("text").to_pylist() for t in tables)
    assert all(a != b for a, b in zip(base, with_adapter)), (base, with_adapter)
    assert tables[1].column("adapter").to_pylist() == ["default"] * 4 and "adapter" not in tables[0].column_names
