"""The job spec: validated once when loaded, immutable after, errors that name the field and value."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydantic
import pytest
import yaml

from jobs.core import adapters
from jobs.core.spec import (
    JobSpec,
    ReplicaCount,
    SpecError,
    apply_overrides,
    load_spec,
    spec_from_dict,
    template_fields,
)


def minimal(**sections) -> dict:
    """The smallest valid spec as data; `sections` update its sections (None removes a key)."""
    data = {
        "input": {"uri": "/data/prompts.parquet", "prompt_column": "prompt"},
        "model": {"path": "org/model"},
        "output": {"uri": "/data/out"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            merged = {**data[section], **values}
            data[section] = {k: v for k, v in merged.items() if v is not None}
        else:
            data[section] = values
    return data


def spec_error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    return str(info.value)


# -- a valid spec ----------------------------------------------------------------


def test_valid_spec_loads_with_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal(generation={"max_new_tokens": 16, "stop": ["\n\n"]})))
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    assert spec.input.prompt_column == "prompt"
    assert spec.generation.max_new_tokens == 16
    assert spec.generation.stop == ("\n\n",)
    assert spec.generation.do_sample is False
    assert spec.resources.replicas.auto  # as many as the cluster holds (jobs/replica_plan.py plan_replicas)
    assert spec.shards.rows_per_shard == "auto"
    assert spec.model.use_safetensors is True


def test_loaded_spec_is_frozen():
    spec = spec_from_dict(minimal())
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.generation.max_new_tokens = 3
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.input = spec.input
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.model.path = "/elsewhere"
    assert spec.generation.max_new_tokens == 128


def test_spec_from_dict_does_not_mutate_its_argument():
    data = minimal(input={"uri": "relative/prompts.parquet"})
    before = yaml.safe_dump(data)
    spec_from_dict(data)
    assert yaml.safe_dump(data) == before


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml.*does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_spec_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


# -- unknown fields ----------------------------------------------------------------


def test_unknown_top_level_field_is_named():
    message = spec_error({**minimal(), "generaton": {"max_new_tokens": 3}})
    assert "generaton: unknown field" in message


@pytest.mark.parametrize(
    "section, field",
    [("generation", "max_tokens"), ("input", "prompt_col"), ("model", "revison"), ("resources", "gpus")],
)
def test_unknown_nested_field_is_named_by_dotted_path(section, field):
    message = spec_error(minimal(**{section: {field: 1}}))
    assert f"{section}.{field}: unknown field" in message


def test_every_bad_field_is_reported_at_once():
    message = spec_error(minimal(generation={"max_new_tokens": 0, "top_p": 2.0}, shards={"rows_per_shard": 0}))
    assert "generation.max_new_tokens" in message
    assert "generation.top_p" in message
    assert "shards.rows_per_shard" in message


def test_missing_required_section_is_named():
    data = minimal()
    del data["model"]
    assert "model: Field required" in spec_error(data)


def test_spec_must_be_a_mapping():
    with pytest.raises(SpecError, match="expected a mapping"):
        spec_from_dict(["input"])  # type: ignore[arg-type]


# -- prompt source ------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        {"prompt_column": None},
        {"prompt_template": "About {topic}"},
        {"messages_column": "messages"},
        {"prompt_column": None, "prompt_template": "About {topic}", "messages_column": "messages"},
    ],
)
def test_exactly_one_prompt_source(given):
    message = spec_error(minimal(input=given))
    assert "input:" in message
    assert "exactly one of prompt_column, prompt_template, messages_column" in message


def test_each_single_prompt_source_is_accepted():
    for given in (
        {"prompt_column": "p"},
        {"prompt_column": None, "prompt_template": "About {topic}"},
        {"prompt_column": None, "messages_column": "messages"},
    ):
        spec = spec_from_dict(minimal(input=given))
        assert len(spec.input.source_columns()) == 1


def test_conflicting_sources_are_listed():
    message = spec_error(minimal(input={"prompt_template": "About {topic}"}))
    assert "prompt_column" in message and "prompt_template" in message
    assert "none" in spec_error(minimal(input={"prompt_column": None}))


# -- bad values name the field and the value ----------------------------------------


@pytest.mark.parametrize(
    "section, values, field, shown",
    [
        ("generation", {"max_new_tokens": -5}, "generation.max_new_tokens", "(got -5)"),
        ("generation", {"max_new_tokens": "lots"}, "generation.max_new_tokens", "(got 'lots')"),
        ("generation", {"top_p": 1.5}, "generation.top_p", "(got 1.5)"),
        ("generation", {"temperature": 0}, "generation.temperature", "(got 0)"),
        ("generation", {"top_k": -1}, "generation.top_k", "(got -1)"),
        ("generation", {"stop": ["ok", ""]}, "generation.stop", "(got ['ok', ''])"),
        ("resources", {"replicas": 0}, "resources.replicas", "(got 0)"),
        ("shards", {"max_failed_fraction": 1.5}, "shards.max_failed_fraction", "(got 1.5)"),
        ("model", {"dtype": "float8"}, "model.dtype", "(got 'float8')"),
    ],
)
def test_bad_value_names_field_and_value(section, values, field, shown):
    message = spec_error(minimal(**{section: values}))
    line = next(line for line in message.splitlines() if field in line)
    assert shown in line, line


def test_empty_stop_string_says_why():
    assert "stop strings must not be empty" in spec_error(minimal(generation={"stop": [""]}))


def test_top_logprobs_need_logprobs():
    message = spec_error(minimal(generation={"top_logprobs": 5}))
    assert "generation.top_logprobs: needs generation.logprobs: true (got 5)" in message
    assert "less than or equal to 20" in spec_error(minimal(generation={"logprobs": True, "top_logprobs": 21}))
    spec = spec_from_dict(minimal(generation={"logprobs": True, "top_logprobs": 20}))
    assert (spec.generation.logprobs, spec.generation.top_logprobs) == (True, 20)


def test_num_return_sequences_needs_sampling():
    message = spec_error(minimal(generation={"num_return_sequences": 3}))
    assert "num_return_sequences" in message
    assert "do_sample" in message
    spec = spec_from_dict(minimal(generation={"num_return_sequences": 3, "do_sample": True}))
    assert spec.generation.num_return_sequences == 3


def test_num_return_sequences_error_names_field_path_and_value():
    message = spec_error(minimal(generation={"num_return_sequences": 3}))
    line = next(line for line in message.splitlines() if "num_return_sequences" in line)
    assert "generation.num_return_sequences" in line
    assert "3" in line.replace("> 1", "")


@pytest.mark.parametrize("template", ["Write {}", "Write {0} about {topic}", "About {topic.name}", "About {x[0]}"])
def test_template_with_positional_or_attribute_fields_is_refused(template):
    message = spec_error(minimal(input={"prompt_column": None, "prompt_template": template}))
    assert "input.prompt_template" in message
    assert repr(template) in message
    assert "named fields" in message


@pytest.mark.parametrize(
    "template, why", [("no fields at all", "names no column"), ("bad {topic", "does not parse")]
)
def test_template_without_fields_or_unparsable_is_refused(template, why):
    message = spec_error(minimal(input={"prompt_column": None, "prompt_template": template}))
    assert "input.prompt_template" in message and why in message


def test_template_fields_in_order_of_first_use():
    assert template_fields("A {style} poem about {topic}, {style}!") == ("style", "topic")
    assert template_fields("{{literal}} {topic!r:>10}") == ("topic",)


def test_pass_through_may_not_shadow_output_columns():
    message = spec_error(minimal(input={"pass_through": ["topic", "text", "finish_reason"]}))
    assert "input.pass_through" in message
    assert "'finish_reason'" in message and "'text'" in message


# -- resources.replicas: a count, auto, or MIN..MAX ----------------------------------------


@pytest.mark.parametrize(
    "given, parsed",
    [
        (3, ReplicaCount(3, 3)),
        ("3", ReplicaCount(3, 3)),
        ("auto", ReplicaCount()),
        ("Auto", ReplicaCount()),
        ("2..8", ReplicaCount(2, 8)),
        (" 2 .. 8 ", ReplicaCount(2, 8)),
        ("4..4", ReplicaCount(4, 4)),
    ],
)
def test_replicas_take_a_count_auto_or_a_range(given, parsed):
    spec = spec_from_dict(minimal(resources={"replicas": given}))
    assert spec.resources.replicas == parsed


def test_replica_count_reads_as_what_it_is():
    assert ReplicaCount.parse(3).fixed == 3 and not ReplicaCount.parse(3).auto
    assert ReplicaCount.parse("4..4").fixed == 4  # a range of one is a count
    r = ReplicaCount.parse("2..8")
    assert (r.min, r.max, r.fixed, r.auto) == (2, 8, None, False)
    assert ReplicaCount.parse("auto").auto and ReplicaCount.parse("auto").fixed is None


@pytest.mark.parametrize("given, written", [(None, "auto"), (3, 3), ("2..8", "2..8"), ("auto", "auto")])
def test_replicas_are_recorded_as_written_and_load_again(given, written):
    # The job record holds the spec as JSON, and `bulkgen resume` loads it from there.
    spec = spec_from_dict(minimal(resources={} if given is None else {"replicas": given}))
    recorded = spec.redacted()
    assert recorded["resources"]["replicas"] == written
    assert spec_from_dict(yaml.safe_load(yaml.safe_dump(recorded))).resources == spec.resources


def test_replicas_from_yaml_and_set():
    ranged = spec_from_dict(apply_overrides(minimal(), ["resources.replicas=2..8"]))
    assert ranged.resources.replicas == ReplicaCount(2, 8)
    assert spec_from_dict(apply_overrides(minimal(), ["resources.replicas=auto"])).resources.replicas.auto
    assert spec_from_dict(apply_overrides(minimal(), ["resources.replicas=5"])).resources.replicas.fixed == 5


@pytest.mark.parametrize(
    "given, why",
    [
        (0, "at least one replica"),
        ("0", "at least one replica"),
        (-2, "at least one replica"),
        ("3..1", "1 <= MIN <= MAX"),
        ("0..4", "1 <= MIN <= MAX"),
        ("x", "give a count"),
        ("2..", "give a count"),
        ("2-8", "give a count"),
        (2.5, "give a count"),
        (True, "give a count"),  # YAML `replicas: yes`
        ({"min": 2, "max": 8}, "give a count"),  # a mapping is not one of the spellings
    ],
)
def test_bad_replicas_name_the_field_the_value_and_the_spellings(given, why):
    message = spec_error(minimal(resources={"replicas": given}))
    line = next(line for line in message.splitlines() if "resources.replicas" in line)
    assert why in line, line
    assert '"auto"' in line and '"MIN..MAX"' in line, line
    if not isinstance(given, dict):
        assert f"(got {given!r})" in line, line


def test_reference_spells_the_replica_forms():
    from jobs.core.spec import reference_markdown

    row = next(r for r in reference_markdown().splitlines() if r.startswith("| `resources.replicas`"))
    assert "| int, `auto` or `MIN..MAX` | `'auto'` |" in row


# -- generation.reasoning ----------------------------------------------------------------


def test_reasoning_is_off_auto_or_a_pair_of_tags(tmp_path):
    assert spec_from_dict(minimal()).generation.reasoning == "off"
    assert spec_from_dict(minimal(generation={"reasoning": "auto"})).generation.reasoning == "auto"
    tags = spec_from_dict(minimal(generation={"reasoning": {"start": "<t>", "end": "</t>"}})).generation.reasoning
    assert (tags.start, tags.end) == ("<t>", "</t>")
    # YAML reads an unquoted `off` as false; it means off.
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal()) + "generation:\n  reasoning: off\n")
    assert load_spec(path).generation.reasoning == "off"
    assert load_spec(path, ["generation.reasoning=auto"]).generation.reasoning == "auto"
    set_tags = load_spec(path, ["generation.reasoning={start: '[THINK]', end: '[/THINK]'}"]).generation.reasoning
    assert (set_tags.start, set_tags.end) == ("[THINK]", "[/THINK]")


def test_reasoning_tags_are_recorded_as_written_and_load_again():
    spec = spec_from_dict(minimal(generation={"reasoning": {"start": "<t>", "end": "</t>"}}))
    recorded = spec.model_dump(mode="json")
    assert recorded["generation"]["reasoning"] == {"start": "<t>", "end": "</t>"}
    assert spec_from_dict(recorded) == spec


@pytest.mark.parametrize(
    "given, why",
    [
        ("on", "give off, auto, or the tags as {start, end} (got 'on')"),
        (True, "give off, auto, or the tags as {start, end} (got True)"),  # YAML `reasoning: yes`
        ({"start": "<t>", "end": "<t>"}, "start and end must be two different, non-empty tags"),
        ({"start": "", "end": "</t>"}, "start and end must be two different, non-empty tags"),
        ({"start": "<t>"}, "end: Field required"),
        ({"start": "<t>", "end": "</t>", "parser": "qwen3"}, "parser: unknown field"),
    ],
)
def test_bad_reasoning_is_one_line_naming_the_field(given, why):
    message = spec_error(minimal(generation={"reasoning": given}))
    assert message.splitlines()[1:] == [f"  generation.reasoning: {why}"]


def test_reference_spells_the_reasoning_forms():
    from jobs.core.spec import reference_markdown

    row = next(r for r in reference_markdown().splitlines() if r.startswith("| `generation.reasoning`"))
    assert "| `off` or `auto` or `{start, end}` | `'off'` |" in row


# -- --set overrides -------------------------------------------------------------------


def test_overrides_set_nested_keys_with_yaml_types():
    data = minimal()
    out = apply_overrides(
        data,
        [
            "generation.max_new_tokens=64",
            "generation.do_sample=true",
            "generation.temperature=0.7",
            'generation.stop=["\\n", "END"]',
            "resources.replicas=4",  # a section the data does not have yet
            "name=nightly",
            "model.revision=",
        ],
    )
    assert out["generation"] == {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "stop": ["\n", "END"]}
    assert out["resources"] == {"replicas": 4}
    assert out["name"] == "nightly"
    assert out["model"]["revision"] == ""
    spec = spec_from_dict(out)
    assert spec.generation.max_new_tokens == 64 and spec.generation.stop == ("\n", "END")


def test_override_value_may_contain_equals_and_urls():
    out = apply_overrides(minimal(), ["input.uri=s3://bucket/a=b/prompts.parquet"])
    assert out["input"]["uri"] == "s3://bucket/a=b/prompts.parquet"


def test_overrides_do_not_mutate_their_input():
    data = minimal(generation={"max_new_tokens": 8})
    apply_overrides(data, ["generation.max_new_tokens=64", "input.storage_options.anon=true"])
    assert data["generation"]["max_new_tokens"] == 8
    assert "storage_options" not in data["input"]


@pytest.mark.parametrize("bad", ["generation.max_new_tokens", "=5", "", "input.uri.deeper=1"])
def test_bad_override_form_raises(bad):
    with pytest.raises(SpecError, match="--set"):
        apply_overrides(minimal(), [bad])


def test_load_spec_applies_overrides_before_validating(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert load_spec(path, ["generation.max_new_tokens=7"]).generation.max_new_tokens == 7
    with pytest.raises(SpecError, match=r"generation.max_new_tokens.*\(got 0\)"):
        load_spec(path, ["generation.max_new_tokens=0"])
    with pytest.raises(SpecError, match="generation.bogus: unknown field"):
        load_spec(path, ["generation.bogus=1"])


# -- fingerprint and redaction -----------------------------------------------------------


def test_fingerprint_ignores_resources_storage_options_and_name():
    base = spec_from_dict(minimal()).fingerprint()
    same = [
        minimal(resources={"replicas": 8, "num_gpus": 1, "batch_size": 4}),
        minimal(input={"storage_options": {"key": "k", "secret": "s"}}),
        minimal(output={"storage_options": {"anon": True}}),
        minimal(name="renamed"),
        minimal(shards={"max_attempts": 9, "max_failed_fraction": 0.5}),
    ]
    for data in same:
        assert spec_from_dict(data).fingerprint() == base, data


@pytest.mark.parametrize(
    "change",
    [
        {"generation": {"temperature": 0.5}},
        {"generation": {"max_new_tokens": 9}},
        {"generation": {"seed": 1}},
        {"generation": {"stop": ["x"]}},
        {"generation": {"reasoning": "auto"}},
        {"generation": {"reasoning": {"start": "<think>", "end": "</think>"}}},
        {"model": {"path": "org/other"}},
        {"input": {"uri": "/data/other.parquet"}},
        {"input": {"pass_through": ["topic"]}},
        {"shards": {"rows_per_shard": 7}},
    ],
)
def test_fingerprint_changes_with_what_decides_the_output(change):
    assert spec_from_dict(minimal(**change)).fingerprint() != spec_from_dict(minimal()).fingerprint()


def test_fingerprint_is_stable():
    assert spec_from_dict(minimal()).fingerprint() == spec_from_dict(minimal()).fingerprint()
    assert len(spec_from_dict(minimal()).fingerprint()) == 16


def test_redacted_hides_storage_option_values():
    spec = spec_from_dict(
        minimal(
            input={"storage_options": {"key": "AKIA-SECRET", "client_kwargs": {"endpoint_url": "http://h"}}},
            output={"storage_options": {"token": "tok-123"}},
        )
    )
    red = spec.redacted()
    assert red["input"]["storage_options"] == {"key": "<redacted>", "client_kwargs": "<redacted>"}
    assert red["output"]["storage_options"] == {"token": "<redacted>"}
    text = repr(red)
    for secret in ("AKIA-SECRET", "tok-123", "http://h"):
        assert secret not in text
    # Redaction is a copy: the spec itself keeps its credentials.
    assert spec.input.storage_options["key"] == "AKIA-SECRET"
    assert red["generation"]["max_new_tokens"] == spec.generation.max_new_tokens


# -- paths -------------------------------------------------------------------------------


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    spec = spec_from_dict(
        minimal(input={"uri": "data/prompts.parquet"}, output={"uri": "out"}, model={"path": "models/tiny"})
    )
    assert spec.input.uri == str(tmp_path / "data" / "prompts.parquet")
    assert spec.output.uri == str(tmp_path / "out")
    assert spec.model.path == str(tmp_path / "models" / "tiny")
    assert all(os.path.isabs(p) for p in (spec.input.uri, spec.output.uri, spec.model.path))


def test_home_relative_paths_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = spec_from_dict(minimal(input={"uri": "~/prompts.parquet"}))
    assert spec.input.uri == str(tmp_path / "prompts.parquet")


def test_urls_and_hub_ids_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict(
        minimal(input={"uri": "s3://bucket/prompts/"}, output={"uri": "memory://out"}, model={"path": "org/model"})
    )
    assert spec.input.uri == "s3://bucket/prompts/"
    assert spec.output.uri == "memory://out"
    assert spec.model.path == "org/model"
    assert not Path(spec.model.path).is_absolute()


# -- adapters ------------------------------------------------------------------------------


def adapter_dir(path: Path, weights: bytes = b"weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_adapters_are_made_absolute_and_hashed_when_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter_dir(tmp_path / "legal")
    spec = spec_from_dict(minimal(model={"adapters": {"legal": "legal"}}, input={"adapter_column": "style"}))
    legal = spec.model.adapters["legal"]
    assert legal.path == str(tmp_path / "legal")
    assert legal.sha256 == adapters.files_sha256(tmp_path / "legal")
    assert spec.model.adapter_set() == {"legal": legal}
    assert spec.model.adapter_field("legal") == "model.adapters.legal"


def test_one_adapter_for_every_row_is_named_default(tmp_path):
    spec = spec_from_dict(minimal(model={"adapter": str(adapter_dir(tmp_path / "a"))}))
    assert list(spec.model.adapter_set()) == ["default"]
    assert spec.model.adapter_field("default") == "model.adapter"
    assert spec_from_dict(minimal()).model.adapter_set() == {}


def test_a_recorded_hash_is_kept_so_a_changed_adapter_shows(tmp_path):
    path = adapter_dir(tmp_path / "a")
    first = spec_from_dict(minimal(model={"adapter": str(path)}))
    adapter_dir(path, weights=b"trained again")
    again = spec_from_dict(minimal(model={"adapter": str(path)}))
    recorded = spec_from_dict(first.redacted())
    assert recorded.model.adapter.sha256 == first.model.adapter.sha256 != again.model.adapter.sha256
    assert recorded.fingerprint() == first.fingerprint() != again.fingerprint()


def test_an_adapter_not_there_keeps_no_hash(tmp_path):
    # Refused by the driver's checks (jobs/preflight.check_adapters), not at load.
    assert spec_from_dict(minimal(model={"adapter": str(tmp_path / "missing")})).model.adapter.sha256 is None


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"adapter": "/a", "adapters": {"b": "/b"}}, "input": {"adapter_column": "c"}},
         "model: give model.adapter (one adapter for every row) or model.adapters (chosen per row by "
         "input.adapter_column), not both"),
        ({"model": {"adapters": {"a b": "/b"}}, "input": {"adapter_column": "c"}},
         "model.adapters: 'a b' is no adapter name; use letters, digits, '_' and '-' (and not '__base__')"),
        ({"model": {"adapters": {"__base__": "/b"}}, "input": {"adapter_column": "c"}}, "'__base__' is no adapter name"),
        ({"model": {"adapters": {"a": "/b"}}},
         "model.adapters needs input.adapter_column, the column naming each row's adapter (or give one "
         "model.adapter for every row)"),
        ({"input": {"adapter_column": "c"}}, "input.adapter_column chooses among model.adapters, which is empty"),
        ({"model": {"adapters": {"legal": {"path": "/b", "sha256": "abc"}}}, "input": {"adapter_column": "c"}},
         "model.adapters.legal.sha256: must be 64 hexadecimal digits (got 'abc')"),
        ({"input": {"uri": "/r.jsonl", "prompt_column": None, "adapter_column": "c"}, "model": {"adapters": {"a": "/b"}}},
         "drop ['adapter_column']"),
        ({"model": {"adapter": {"sha256": "0" * 64}}}, "model.adapter.path: Field required"),
    ],
)  # fmt: skip
def test_adapter_fields_are_refused_naming_the_field(sections, message):
    assert message in spec_error(minimal(**sections))


def test_a_batch_input_chooses_adapters_by_its_lines(tmp_path):
    spec = spec_from_dict(minimal(input={"uri": "/r.jsonl", "prompt_column": None}, model={"adapters": {"a": "/b"}}))
    assert list(spec.model.adapter_set()) == ["a"]


def test_without_adapters_the_fingerprint_is_unchanged():
    assert "adapter" not in json.dumps(spec_from_dict(minimal()).model_dump(exclude_defaults=True))
    assert spec_from_dict(minimal(model={"adapters": {}})).fingerprint() == spec_from_dict(minimal()).fingerprint()


# -- refusals at load (issue 16) ---------------------------------------------------------


@pytest.mark.parametrize(
    "sections, fragments",
    [
        ({"input": {"pass_through": ["topic", "topic"]}}, ["data/", "'topic' twice", "input.pass_through (2 times)"]),
        ({"evaluation": {"reference_column": "text"}}, ["'text' twice", "evaluation.reference_column", "bulkgen generates"]),
        ({"evaluation": {"reference_column": "rougeL"}}, ["'rougeL' twice", "evaluation's scores"]),
        ({"input": {"prompt_column": "error_code"}}, ["errors/", "'error_code' twice", "input.prompt_column"]),
        ({"input": {"prompt_column": None, "prompt_template": "{sample_index}"}}, ["errors/", "input.prompt_template"]),
        (
            {"generation": {"reasoning": "auto"}, "evaluation": {"reference_column": "reasoning"}},
            ["data/", "'reasoning' twice", "evaluation.reference_column and generation.reasoning"],
        ),
        ({"evaluation": {"reference_column": "top_logprobs"}, "generation": {"logprobs": True, "top_logprobs": 2}},
         ["data/", "'top_logprobs' twice", "evaluation.reference_column and generation.logprobs"]),
        # A feature's column is never an input column's name, even with the feature off: output.jsonl
        # and the report read it by name.
        ({"input": {"pass_through": ["reasoning"]}}, ["input.pass_through names ['reasoning']", "may write"]),
    ],
)
def test_a_column_written_twice_is_refused_naming_both_sources(sections, fragments):
    message = spec_error(minimal(**sections))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_columns_read_once_and_written_once_are_fine():
    # The reference is also passed through, the prompt column also passed through: each written once.
    spec = spec_from_dict(
        minimal(input={"prompt_column": "question", "pass_through": ["ref", "question"]}, evaluation={"reference_column": "ref"})
    )
    assert spec.evaluation.reference_column == "ref"


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused(field, value):
    message = spec_error(minimal(generation={"do_sample": True, field: value}))
    assert f"generation.{field}: Input should be a finite number" in message


@pytest.mark.parametrize("field", ["prompt_column", "id_column", "max_new_tokens_column"])
def test_empty_column_names_are_refused(field):
    assert f"input.{field}: a column name must not be empty (got '')" in spec_error(minimal(input={field: ""}))


def test_template_with_an_unknown_conversion_is_refused():
    message = spec_error(minimal(input={"prompt_column": None, "prompt_template": "About {topic!z}"}))
    assert "input.prompt_template" in message and "{topic!z}" in message
    for conversion in "rsa":
        assert spec_from_dict(minimal(input={"prompt_column": None, "prompt_template": f"About {{topic!{conversion}}}"}))


def test_min_mean_logprob_needs_logprobs_and_a_bound_a_mean_can_pass():
    message = spec_error(minimal(filters={"min_mean_logprob": -2}))
    assert "filters.min_mean_logprob -2.0 needs generation.logprobs: true" in message
    above_zero = minimal(generation={"logprobs": True}, filters={"min_mean_logprob": 0.5})
    assert "less than or equal to 0" in spec_error(above_zero)  # a mean logprob never is: every row would go
    spec = spec_from_dict(minimal(generation={"logprobs": True}, filters={"min_mean_logprob": -2}))
    assert spec.filters.min_mean_logprob == -2.0

def test_min_completion_tokens_over_max_new_tokens_is_refused_for_spec_inputs_only():
    message = spec_error(minimal(filters={"min_completion_tokens": 100}, generation={"max_new_tokens": 8}))
    assert "filters.min_completion_tokens 100 > generation.max_new_tokens 8" in message
    assert spec_from_dict(minimal(filters={"min_completion_tokens": 8}, generation={"max_new_tokens": 8}))
    # A batch request's own max_tokens overrides generation.max_new_tokens.
    batch = minimal(input={"uri": "/data/requests.jsonl", "prompt_column": None}, filters={"min_completion_tokens": 500})
    assert spec_from_dict(batch).input.format == "openai-batch"


def test_overrides_take_text_fields_as_written():
    out = apply_overrides(
        minimal(),
        ["name=nightly #3", "output.uri=/x #y/out", "input.prompt_template=a: b: {c}", "model.dtype=float16 # half",
         "cache.uri=s3://b/c #1"],
    )  # fmt: skip
    assert out["name"] == "nightly #3"
    assert out["output"]["uri"] == "/x #y/out"
    assert out["input"]["prompt_template"] == "a: b: {c}"
    assert out["model"]["dtype"] == "float16 # half"  # a choice of strings: refused, not cut at its comment
    assert out["cache"] == {"uri": "s3://b/c #1"}
    assert "model.dtype" in spec_error(out)


def test_overrides_of_other_fields_are_yaml():
    out = apply_overrides(
        minimal(), ["shards.rows_per_shard=50 # small", "input.storage_options.anon=true", "resources.replicas=2..4",
                    "generation.bogus=1", "input.pass_through=[a, b]"],
    )  # fmt: skip
    assert out["shards"]["rows_per_shard"] == 50
    assert out["input"]["storage_options"] == {"anon": True}
    assert out["input"]["pass_through"] == ["a", "b"]
    assert out["generation"]["bogus"] == 1
    assert "generation.bogus: unknown field" in spec_error(out)


def test_an_override_yaml_cannot_read_names_itself():
    with pytest.raises(SpecError, match=r"--set 'generation.max_new_tokens=a: b: c': the value is not a YAML value"):
        apply_overrides(minimal(), ["generation.max_new_tokens=a: b: c"])
