"""Specs that used to run into a wrong or unreadable output, or fail late (issue 16): each is now
refused by `bulkgen validate` and by `bulkgen run` before Ray starts, exit 2, naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.core.spec import load_spec, spec_from_dict
from jobs.preflight import check_attn_implementation
from jobs.validate import validate
from tests.conftest import job_dict, write_job, write_prompts
from tests.tiny_model import save_tiny_model, train_lora
from tests.jobs.test_bad_input import cli_refuses, files_under, nothing_heavy_starts, prompts  # noqa: F401 (fixtures)


def job(tmp_path: Path, model_path: Path, input_dir: Path, model_fields: dict | None = None, **sections) -> Path:
    data = job_dict(str(input_dir), str(tmp_path / "out"), model_path, **sections)
    data["model"].update(model_fields or {})
    return write_job(tmp_path / "job.yaml", data)


# -- the output's columns: each name once in every file ---------------------------------------------


@pytest.mark.parametrize(
    "sections, fragments",
    [
        ({"input": {"pass_through": ["topic", "topic"]}}, ["data/", "'topic' twice", "input.pass_through (2 times)"]),
        # A column bulkgen writes, and a score column the evaluation writes.
        ({"evaluation": {"reference_column": "text"}}, ["'text' twice", "evaluation.reference_column", "bulkgen generates"]),
        ({"evaluation": {"reference_column": "bleu"}}, ["'bleu' twice", "evaluation.reference_column", "evaluation's scores"]),
        ({"evaluation": {"reference_column": "id"}}, ["'id' twice", "input.id_column", "evaluation.reference_column"]),
    ],
)
def test_a_column_written_twice_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts, sections, fragments):
    cli_refuses(job(tmp_path, tiny_model, prompts, **sections), capsys, *fragments)
    assert not (tmp_path / "out").exists()


def test_an_input_column_named_like_an_error_column_is_refused(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    # errors/ holds the input's columns beside its own error columns.
    pq.write_table(pa.table({"id": ["a", "b"], "error": ["Write one", "Write two"]}), tmp_path / "in.parquet")
    path = job(tmp_path, tiny_model, tmp_path / "in.parquet", input={"prompt_column": "error", "pass_through": []})
    cli_refuses(path, capsys, "errors/", "'error' twice", "input.prompt_column")


# -- values that mean nothing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"generation": {"do_sample": True, "temperature": float("inf")}}, "generation.temperature"),
        ({"generation": {"do_sample": True, "top_p": float("nan")}}, "generation.top_p"),
        ({"generation": {"repetition_penalty": float("inf")}}, "generation.repetition_penalty"),
        ({"filters": {"near_duplicate_threshold": float("nan")}}, "filters.near_duplicate_threshold"),
        ({"resources": {"num_cpus": float("inf")}}, "resources.num_cpus"),
    ],
)
def test_non_finite_floats_are_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts, sections, field):
    cli_refuses(job(tmp_path, tiny_model, prompts, **sections), capsys, field, "finite number")


@pytest.mark.parametrize(
    "input_fields, field",
    [
        ({"prompt_column": ""}, "input.prompt_column"),
        ({"id_column": ""}, "input.id_column"),
        ({"prompt_column": None, "messages_column": ""}, "input.messages_column"),
        ({"max_new_tokens_column": ""}, "input.max_new_tokens_column"),
        ({"pass_through": ["topic", ""]}, "input.pass_through"),
    ],
)
def test_empty_column_names_are_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts, input_fields, field):
    cli_refuses(job(tmp_path, tiny_model, prompts, input=input_fields), capsys, field, "must not be empty")


def test_an_empty_reference_column_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    cli_refuses(job(tmp_path, tiny_model, prompts, evaluation={"reference_column": ""}), capsys, "evaluation.reference_column")


@pytest.mark.parametrize(
    "sections, fragments",
    [
        ({"filters": {"min_completion_tokens": 100}}, ["filters.min_completion_tokens 100", "generation.max_new_tokens 8"]),
        ({"filters": {"min_completion_tokens": 6, "max_completion_tokens": 4}}, ["min_completion_tokens 6", "max_completion_tokens 4"]),
    ],
)
def test_a_filter_no_completion_can_pass_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts, sections, fragments):
    cli_refuses(job(tmp_path, tiny_model, prompts, **sections), capsys, *fragments, "filtered out")


def test_a_filter_at_the_limit_is_fine(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model, filters={"min_completion_tokens": 8, "max_completion_tokens": 8})
    validate(spec_from_dict(data))


# -- the prompt template -----------------------------------------------------------------------------


def test_a_template_conversion_python_does_not_have_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = job(tmp_path, tiny_model, prompts, input={"prompt_column": None, "prompt_template": "Write about {topic!z}"})
    cli_refuses(path, capsys, "input.prompt_template", "{topic!z}", "!r, !s or !a")


def test_a_format_spec_the_column_type_does_not_take_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = job(tmp_path, tiny_model, prompts, input={"prompt_column": None, "prompt_template": "Write about {topic:d}"})
    cli_refuses(path, capsys, "input.prompt_template", "{topic:d}", "row-00000", "a.parquet", "topic: string")


def test_a_format_spec_the_column_type_takes_passes(tmp_path, tiny_model, nothing_heavy_starts):
    # Nulls first: the check renders the first row that has every field.
    write_prompts(tmp_path / "in" / "a.parquet", 4, words=pa.array([None, 2, 3, 4], pa.int64()))
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                    input={"prompt_column": None, "prompt_template": "Write {words:03d} words about {topic!r}"})  # fmt: skip
    assert validate(spec_from_dict(data)).input_rows == 4


# -- `bulkgen validate` says when the run would fail --------------------------------------------------


def write_prompts_with_empty_ones(path: Path) -> None:
    write_prompts(path, 10)
    table = pq.read_table(path)
    texts = table.column("prompt").to_pylist()
    texts[3] = texts[7] = "   "
    pq.write_table(table.set_column(1, "prompt", pa.array(texts)), path)


def test_validate_exits_2_when_the_rows_that_would_fail_exceed_the_error_budget(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    write_prompts_with_empty_ones(tmp_path / "in.parquet")
    path = job(tmp_path, tiny_model, tmp_path / "in.parquet")
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert "would fail: 2 rows" in captured.out  # the report is printed first
    assert "empty_prompt: 2 rows" in captured.out
    assert captured.err.startswith("bulkgen: error: 2 of 10 input rows would fail (20.00%)")
    assert "shards.max_failed_fraction=0.0" in captured.err and "the run would fail" in captured.err


@pytest.mark.parametrize("budget, exit_code", [(0.2, 0), (0.19, 2)])
def test_validate_exits_0_when_the_error_budget_holds_the_failing_rows(tmp_path, tiny_model, capsys, nothing_heavy_starts, budget, exit_code):
    write_prompts_with_empty_ones(tmp_path / "in.parquet")
    path = job(tmp_path, tiny_model, tmp_path / "in.parquet", shards={"rows_per_shard": 10, "max_failed_fraction": budget})
    assert main(["validate", str(path)]) == exit_code
    assert "would fail: 2 rows" in capsys.readouterr().out


def test_a_partial_scan_refuses_only_what_surely_fails(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    # 1 failing row in the first 5 scanned is 10% of the 10 rows, within a 15% budget.
    write_prompts_with_empty_ones(tmp_path / "in.parquet")
    path = job(tmp_path, tiny_model, tmp_path / "in.parquet", shards={"rows_per_shard": 10, "max_failed_fraction": 0.15})
    assert main(["validate", str(path), "--max-rows", "5"]) == 0
    assert "would fail: 1 rows" in capsys.readouterr().out


# -- the model's attention implementation --------------------------------------------------------------


def test_an_unknown_attn_implementation_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = job(tmp_path, tiny_model, prompts, model_fields={"attn_implementation": "bogus"})
    cli_refuses(path, capsys, "model.attn_implementation 'bogus'", "'eager'", "'sdpa'", "'flash_attention_2'")


@pytest.mark.parametrize("name", ["eager", "sdpa", "flash_attention_2", "flex_attention", "paged|eager", "paged|sdpa",
                                  "kernels-community/flash-attn2", "kernels-community/vllm-flash-attn3@v1:fn"])  # fmt: skip
def test_attn_implementations_transformers_knows_pass(tmp_path, tiny_model, name):
    data = job_dict("/in", "/out", tiny_model)
    data["model"]["attn_implementation"] = name
    check_attn_implementation(spec_from_dict(data))


# -- an output that cannot be created ------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["/proc/bulkgen-out", "/proc/bulkgen-out/deeper", "/proc/self", "/sys/bulkgen-out"])
def test_an_output_under_proc_or_sys_is_refused(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts, uri):
    path = write_job(tmp_path / "job.yaml", job_dict(str(prompts), uri, tiny_model))
    cli_refuses(path, capsys, "output.uri", repr(uri), "takes no new directories")


def test_the_output_check_leaves_nothing_behind(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    # A new output (its parent is probed) and an existing one (probed itself).
    (tmp_path / "existing").mkdir()  # empty: a directory with files of its own is not an output bulkgen takes
    before = files_under(tmp_path)
    for out in (tmp_path / "new" / "out", tmp_path / "existing"):
        validate(spec_from_dict(job_dict(str(prompts), str(out), tiny_model)))
    assert files_under(tmp_path) == before


# -- --set takes a string field's text as written ------------------------------------------------------


def test_set_takes_text_fields_as_written(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = job(tmp_path, tiny_model, prompts)
    out = tmp_path / "x #y" / "out"
    sets = ["name=nightly #3", f"output.uri={out}", "model.revision= main ", "generation.max_new_tokens=4 # tokens"]
    spec = load_spec(path, sets)
    assert spec.name == "nightly #3" and spec.output.uri == str(out) and spec.model.revision == " main "
    assert spec.generation.max_new_tokens == 4  # a number is still YAML, comment and all
    assert main(["validate", str(path), *(a for s in sets[:2] for a in ("--set", s))]) == 0
    capsys.readouterr()


def test_set_with_a_value_yaml_cannot_read_exits_2(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = job(tmp_path, tiny_model, prompts)
    assert main(["validate", str(path), "--set", "name=a: b: c"]) == 0  # text: taken as written
    capsys.readouterr()
    assert main(["validate", str(path), "--set", "generation.max_new_tokens=a: b: c"]) == 2
    err = capsys.readouterr().err
    assert "--set 'generation.max_new_tokens=a: b: c'" in err and "Traceback" not in err


# -- adapters (model.adapter, model.adapters) ----------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_adapters(tiny_gpt2, tmp_path_factory) -> dict[str, Path]:
    """Adapters of other base models: a Llama half as wide, and GPT-2 (other module names)."""
    root = tmp_path_factory.mktemp("foreign")
    narrow = save_tiny_model(root / "narrow-llama", hidden=32)
    return {
        "narrow": train_lora(narrow, root / "narrow", "Write a poem.", seed=0, steps=1),
        "gpt2": train_lora(tiny_gpt2, root / "gpt2", "Write a poem.", seed=0, steps=1, target_modules=("c_attn",)),
    }


def adapter_job(tmp_path: Path, model: Path, adapters: dict, names=("poem", None, "code", "poem"), **model_fields) -> Path:
    """A job over rows naming `names` in their `adapter` column, choosing among `adapters` ({name: path or spec})."""
    write_prompts(tmp_path / "in" / "a.parquet", len(names), adapter=list(names))
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model)
    data["model"].update(adapters={k: v if isinstance(v, dict) else str(v) for k, v in adapters.items()}, **model_fields)
    data["input"]["adapter_column"] = "adapter"
    return write_job(tmp_path / "job.yaml", data)


def test_adapters_that_fit_pass(tmp_path, tiny_model, lora_adapters, nothing_heavy_starts):
    checked = validate(load_spec(adapter_job(tmp_path, tiny_model, lora_adapters)))
    assert {name: a["r"] for name, a in checked.model["adapters"].items()} == {"code": 8, "poem": 8}


@pytest.mark.parametrize(
    "foreign, fragments",
    [
        ("narrow", ["model.adapters.code does not fit model.path", "model.layers.0.self_attn.q_proj takes 64 inputs, "
                    "the adapter's lora_A expects 32"]),
        ("gpt2", ["model.adapters.code does not fit model.path", "adapts transformer.h.0.attn.c_attn, which the base "
                  "model does not have (trained on another base model?)"]),
    ],
)  # fmt: skip
def test_an_adapter_of_another_base_model_is_refused(tmp_path, tiny_model, lora_adapters, foreign_adapters, capsys,
                                                     nothing_heavy_starts, foreign, fragments):  # fmt: skip
    path = adapter_job(tmp_path, tiny_model, {"poem": lora_adapters["poem"], "code": foreign_adapters[foreign]})
    cli_refuses(path, capsys, *fragments)


def edited_adapter(source: Path, target: Path, **config) -> Path:
    shutil.copytree(source, target)
    doc = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**doc, **config}))
    return target


def test_an_adapter_that_is_not_lora_or_uses_dora_is_refused(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    prefix = edited_adapter(lora_adapters["code"], tmp_path / "prefix", peft_type="PREFIX_TUNING")
    cli_refuses(adapter_job(tmp_path, tiny_model, {"poem": lora_adapters["poem"], "code": prefix}), capsys,
                f"model.adapters.code: {prefix} is a PREFIX_TUNING adapter; only LoRA adapters are supported")  # fmt: skip
    dora = edited_adapter(lora_adapters["code"], tmp_path / "dora", use_dora=True)
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace(str(prefix), str(dora)))
    cli_refuses(tmp_path / "job.yaml", capsys, "model.adapters.code", "uses DoRA, which neither vLLM 0.32 nor PEFT's mixed-adapter batches run")


def test_a_missing_or_pickled_adapter_is_refused(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    path = adapter_job(tmp_path, tiny_model, {"poem": tmp_path / "nowhere"}, names=("poem",))
    cli_refuses(path, capsys, f"model.adapters.poem: {tmp_path / 'nowhere'} is no PEFT adapter directory (no adapter_config.json)")
    pickled = shutil.copytree(lora_adapters["poem"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text().replace(str(tmp_path / "nowhere"), str(pickled)))
    cli_refuses(tmp_path / "job.yaml", capsys, "model.adapters.poem", "only pickle weights (adapter_model.bin)", "model.use_safetensors: false")


def test_an_adapter_changed_since_the_spec_pinned_it_is_refused(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    pinned = {"path": str(lora_adapters["poem"]), "sha256": "0" * 64}
    path = adapter_job(tmp_path, tiny_model, {"poem": pinned}, names=("poem",))
    cli_refuses(path, capsys, "model.adapters.poem", "files' sha256 is", f"the spec pins {'0' * 64}: the adapter changed")


def test_a_row_naming_no_adapter_of_the_job_is_refused(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    path = adapter_job(tmp_path, tiny_model, lora_adapters, names=("poem", None, "peom", "code"))
    cli_refuses(path, capsys, "input.adapter_column 'adapter': row 'row-00002' of a.parquet names adapter 'peom'; "
                              "model.adapters has ['code', 'poem']")  # fmt: skip


def test_an_adapter_column_that_is_no_text_is_refused(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    write_prompts(tmp_path / "in" / "a.parquet", 2, adapter=pa.array([1, 2]))
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
    data["model"]["adapters"] = {"poem": str(lora_adapters["poem"])}
    data["input"]["adapter_column"] = "adapter"
    cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "input.adapter_column 'adapter'", "has type int64; expected text")


def test_vllm_refuses_an_adapter_it_cannot_load(tmp_path, tiny_model, lora_adapters, capsys, nothing_heavy_starts):
    saved = edited_adapter(lora_adapters["poem"], tmp_path / "saved", modules_to_save=["lm_head"])
    path = adapter_job(tmp_path, tiny_model, {"poem": saved}, names=("poem",), engine="vllm")
    cli_refuses(path, capsys, "model.engine is vllm, but model.adapters.poem uses modules_to_save ['lm_head'], "
                              "which vLLM 0.32 does not load; use model.engine: transformers")  # fmt: skip
