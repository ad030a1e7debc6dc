"""JobSpec.fingerprint: stable across releases.

A field left at its default stays out of the hash, so a release that adds a
field with a default still resumes the outputs of the release before. The
golden fingerprints below must never change; the pinned defaults make a
changed default (which changes what every spec that leaves the field unset
means) a visible decision that bumps FINGERPRINT_VERSION and these goldens."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from pydantic import BaseModel, Field

from jobs.core.spec import FINGERPRINT_VERSION, NOT_DECISIVE, GenerationSpec, JobSpec, spec_from_dict

BASE = {
    "input": {"uri": "/data/prompts.parquet", "prompt_column": "prompt"},
    "model": {"path": "org/model"},
    "output": {"uri": "/data/out"},
}

GOLDEN = [
    (BASE, "0f65fd1def7a9403"),
    ({**BASE, "generation": {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "seed": 3}}, "42a8f5b235ac3e5b"),
    ({**BASE, "input": {"uri": "/data/p", "prompt_template": "Write about {topic}", "id_column": "id",
                        "pass_through": ["topic"]}, "shards": {"rows_per_shard": 100}}, "223b73616723a6fb"),  # fmt: skip
    ({**BASE, "filters": {}}, "bf697118acc66fa7"),
    ({**BASE, "evaluation": {"reference_column": "ref"}, "filters": {"deduplicate": "exact"}}, "71eb77fda6800691"),
    ({"input": {"uri": "/data/requests.jsonl"}, "model": {"path": "org/model"}, "output": {"uri": "/o"}}, "58a083c64c120ad1"),
]


@pytest.mark.parametrize("data, fingerprint", GOLDEN)
def test_golden_fingerprints(data, fingerprint):
    assert spec_from_dict(data).fingerprint() == fingerprint


def test_the_formula():
    # sha256 of the decisive fields as sorted JSON, with the formula's version; 16 hex digits.
    document = {"input": {"prompt_column": "prompt", "uri": "/data/prompts.parquet"}, "model": {"path": "org/model"},
                "fingerprint_version": FINGERPRINT_VERSION}  # fmt: skip
    expected = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]
    assert spec_from_dict(BASE).fingerprint() == expected


def test_a_schemas_property_order_is_part_of_the_job():
    # Completions write an object's properties in the schema's order: another order is another output.
    def fingerprint(properties: dict) -> str:
        schema = {"type": "object", "properties": properties}
        return spec_from_dict({**BASE, "generation": {"structured": {"json_schema": schema}}}).fingerprint()

    a, b = {"type": "string"}, {"type": "integer"}
    assert fingerprint({"a": a, "b": b}) != fingerprint({"b": b, "a": a})
    assert fingerprint({"a": a, "b": b}) == fingerprint({"a": dict(a), "b": dict(b)})


def test_fields_given_at_their_default_change_nothing():
    spelled_out = {
        **BASE,
        "input": {**BASE["input"], "format": "parquet", "pass_through": []},
        "model": {"path": "org/model", "engine": "auto", "dtype": "auto", "use_safetensors": True},
        "generation": {"max_new_tokens": 128, "temperature": 1, "stop": []},
        "shards": {"rows_per_shard": "auto", "max_attempts": 5},
    }
    assert spec_from_dict(spelled_out).fingerprint() == spec_from_dict(BASE).fingerprint()


def test_a_field_added_with_a_default_changes_no_fingerprint():
    # The next release, as it would add model.engine or input.format: a new field with a default.
    class NextGeneration(GenerationSpec):
        min_p: float = 0.0

    class NextJobSpec(JobSpec):
        generation: NextGeneration = Field(default_factory=NextGeneration)

    for data, fingerprint in GOLDEN:
        assert NextJobSpec.model_validate(data).fingerprint() == JobSpec.model_validate(data).fingerprint()
    changed = {**BASE, "generation": {"min_p": 0.05}}
    assert NextJobSpec.model_validate(changed).fingerprint() != JobSpec.model_validate(BASE).fingerprint()


def test_an_optional_section_given_empty_counts():
    # filters: {} turns the default filters on; it is not the job without filters.
    assert spec_from_dict({**BASE, "filters": {}}).fingerprint() != spec_from_dict(BASE).fingerprint()


def decisive_defaults(model: type[BaseModel], exclude: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every decisive field's default, by dotted path (sections walked, also the optional ones)."""
    defaults = {}
    for name, f in model.model_fields.items():
        rule = exclude.get(name)
        if rule is True:
            continue
        section = next((a for a in (f.annotation, *getattr(f.annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)  # fmt: skip
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        # A field that may hold a section but defaults to a plain value (reasoning: off) pins that value;
        # a mapping of sections (model.adapters) pins its sections' fields.
        if section is not None and (default in ("required", None) or isinstance(default, (BaseModel, dict))):
            defaults |= decisive_defaults(section, dict.fromkeys(rule or (), True), f"{prefix}{name}.")
        else:
            defaults[f"{prefix}{name}"] = default
    return defaults


def test_the_defaults_of_decisive_fields_are_pinned():
    """Adding a field with a default: add it here (no goldens change). Changing a default: bump
    FINGERPRINT_VERSION in jobs/core/spec.py and the goldens above, since unset fields now mean another job."""
    assert FINGERPRINT_VERSION == 2
    assert decisive_defaults(JobSpec, NOT_DECISIVE) == {
        "input.uri": "required",
        "input.format": "parquet",
        "input.prompt_column": None,
        "input.prompt_template": None,
        "input.messages_column": None,
        "input.id_column": None,
        "input.pass_through": (),
        "input.max_new_tokens_column": None,
        "input.adapter_column": None,
        "input.schema_column": None,
        "model.path": "required",
        "model.revision": None,
        "model.tokenizer": None,
        "model.dtype": "auto",
        "model.trust_remote_code": False,
        "model.use_safetensors": True,
        "model.attn_implementation": None,
        "model.engine": "auto",
        "model.adapter.path": "required",
        "model.adapter.sha256": None,
        "model.adapters.path": "required",  # of each adapter
        "model.adapters.sha256": None,
        "generation.max_new_tokens": 128,
        "generation.do_sample": False,
        "generation.temperature": 1.0,
        "generation.top_p": 1.0,
        "generation.top_k": 0,
        "generation.num_return_sequences": 1,
        "generation.repetition_penalty": 1.0,
        "generation.no_repeat_ngram_size": 0,
        "generation.stop": (),
        "generation.seed": 0,
        "generation.reasoning": "off",
        "generation.structured.json_schema": None,
        "generation.structured.regex": None,
        "generation.structured.choices": None,
        "generation.structured.json_object": False,
        "generation.structured.whitespace": "compact",
        "generation.logprobs": False,
        "generation.top_logprobs": 0,
        "output.include_prompt": False,
        "output.format": "parquet",
        "evaluation.reference_column": "required",
        "filters.min_completion_tokens": None,
        "filters.max_completion_tokens": None,
        "filters.min_mean_logprob": None,
        "filters.must_match": None,
        "filters.must_not_match": None,
        "filters.drop_empty": True,
        "filters.drop_prompt_echo": True,
        "filters.deduplicate": "near",
        "filters.near_duplicate_threshold": 0.8,
        "shards.rows_per_shard": "auto",
        "shards.group_by_prefix": "off",
    }
