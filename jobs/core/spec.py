"""The job spec: one YAML file, validated once when loaded, immutable after.

Field docs live here and only here; the README's reference is generated from
nothing else but points at this file and the example job that the tests load.
(Over 300 lines on purpose: each field's doc stands beside the field.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import core_schema

from jobs.core import adapters, rows, structured
from jobs.core.errors import SpecError
from jobs.core.layout import DATA, ERRORS, FILTERED
from jobs.core.rows import DERIVED_ID, WRITTEN_COLUMNS


class _Section(BaseModel):
    # Unknown fields are errors (a typo must not be silently ignored) and a
    # loaded spec never changes. No float field means anything at inf or nan
    # (temperature: .inf sampled uniformly: random text, exit 0).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _column_name_given(name: str | None) -> str | None:
    if name == "":
        raise ValueError("a column name must not be empty")
    return name


class InputSpec(_Section):
    uri: str = Field(description="A Parquet file, a directory of them, or a glob; any fsspec protocol.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Passed to fsspec for the input.")
    format: Literal["parquet", "openai-batch"] = Field(
        "parquet",
        description="`openai-batch`: OpenAI batch JSONL files (a file, a directory of `*.jsonl`, or a glob), one "
        "request a line; ids are the custom_ids, prompts and per-request settings come from each line's body, so "
        "no prompt or id field is given. Default: openai-batch for a uri ending in .jsonl when no prompt field is "
        "given, else parquet.",
    )
    prompt_column: str | None = Field(None, description="Column holding the prompt text.")
    prompt_template: str | None = Field(
        None, description='Python format string over the row\'s columns, e.g. "Write a {style} poem about {topic}".'
    )
    messages_column: str | None = Field(
        None, description="Column of chat messages [{role, content}], rendered with the tokenizer's chat template."
    )
    id_column: str | None = Field(
        None, description="Unique row id. Without it, ids are '<file relative to the input root>:<row index>'."
    )
    pass_through: tuple[str, ...] = Field((), description="Input columns copied to every output row.")
    max_new_tokens_column: str | None = Field(
        None, description="Integer column with a per-row limit on new tokens (capped by generation.max_new_tokens)."
    )
    adapter_column: str | None = Field(
        None, description="Column naming each row's adapter (a key of model.adapters); null: the base model."
    )
    schema_column: str | None = Field(
        None,
        description="Column of JSON schemas (JSON text), one per row; null: generation.structured, if any. Each "
        "row's completions follow its own schema (see the README's structured output).",
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, data: Any) -> Any:
        # A .jsonl input that names no prompt column is a batch file; a batch file's ids are its custom_ids.
        if isinstance(data, dict):
            sources = ("prompt_column", "prompt_template", "messages_column")
            batch = data.get("format") == "openai-batch" or (
                data.get("format") is None
                and str(data.get("uri", "")).endswith(".jsonl")
                and not any(data.get(name) is not None for name in sources)
            )
            data = {**data, "format": "openai-batch" if batch else data.get("format") or "parquet"}
            if batch:
                data.setdefault("id_column", "custom_id")
        return data

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSpec:
        if self.format == "openai-batch":
            given = [n for n in ("prompt_column", "prompt_template", "messages_column", "max_new_tokens_column",
                                 "adapter_column", "schema_column") if getattr(self, n) is not None]
            given += ["pass_through"] if self.pass_through else []
            if given:
                raise ValueError(f"an openai-batch input takes prompts and settings from each line's body; drop {given}")
            if self.id_column != "custom_id":
                raise ValueError(f"an openai-batch input's ids are its custom_ids; drop id_column {self.id_column!r}")
            return self
        given = [n for n in ("prompt_column", "prompt_template", "messages_column") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt_column, prompt_template, messages_column (got {given or 'none'})"
            )
        return self

    @field_validator(
        "prompt_column", "messages_column", "id_column", "max_new_tokens_column", "adapter_column", "schema_column"
    )
    @classmethod
    def _column_not_empty(cls, name: str | None) -> str | None:
        return _column_name_given(name)

    @field_validator("pass_through")
    @classmethod
    def _pass_through_not_empty(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            _column_name_given(name)
        return names

    @field_validator("prompt_template")
    @classmethod
    def _template_parses(cls, template: str | None) -> str | None:
        if template is not None:
            template_fields(template)  # raises ValueError naming the problem
        return template

    def source_columns(self) -> tuple[str, ...]:
        """Input columns the prompt is built from."""
        if self.prompt_column:
            return (self.prompt_column,)
        if self.messages_column:
            return (self.messages_column,)
        return template_fields(self.prompt_template or "")


class AdapterSpec(_Section):
    """A PEFT LoRA adapter; in YAML its path alone, or {path, sha256}."""

    path: str = Field(
        description="A PEFT LoRA adapter directory (save_pretrained: adapter_config.json, adapter_model.safetensors)."
    )
    sha256: str | None = Field(
        None, description="Its files' SHA-256; filled in when the spec is loaded, checked when given."
    )

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("sha256")
    @classmethod
    def _hex(cls, digest: str | None) -> str | None:
        if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ValueError("must be 64 hexadecimal digits")
        return digest.lower() if digest is not None else None


class ModelSpec(_Section):
    path: str = Field(description="Local directory or Hugging Face hub id, loaded with AutoModelForCausalLM.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id, when it differs from `path`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype; auto keeps the checkpoint's own."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the checkpoint.")
    use_safetensors: bool = Field(
        True, description="Load safetensors weights only; set false to allow pickle (.bin) checkpoints."
    )
    attn_implementation: str | None = Field(None, description='e.g. "sdpa", "eager", "flash_attention_2".')
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="Generation engine; auto: vLLM where it is installed and can honour the spec, else transformers.",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the engine as it is, e.g. vLLM's gpu_memory_utilization, max_model_len, enforce_eager.",
    )
    adapter: AdapterSpec | None = Field(
        None,
        description='A LoRA adapter for every row: a PEFT adapter directory (named "default" in the adapter column).',
        json_schema_extra={"reference_kind": "path"},
    )
    adapters: dict[str, AdapterSpec] = Field(
        default_factory=dict,
        description="LoRA adapters by name, each a PEFT adapter directory; input.adapter_column (a batch line: "
        "body.model) chooses one per row, all served by one replica. See the README's adapters.",
        json_schema_extra={"reference_kind": "mapping of name to path"},
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, given: dict[str, AdapterSpec]) -> dict[str, AdapterSpec]:
        for name in given:
            if not adapters.is_name(name):
                raise ValueError(
                    f"{name!r} is no adapter name; use letters, digits, '_' and '-' (and not {adapters.BASE!r})"
                )
        return given

    @model_validator(mode="after")
    def _one_way_to_adapt(self) -> ModelSpec:
        if self.adapter is not None and self.adapters:
            raise ValueError(
                "give model.adapter (one adapter for every row) or model.adapters (chosen per row by "
                "input.adapter_column), not both"
            )
        return self

    def adapter_set(self) -> dict[str, AdapterSpec]:
        """The job's adapters by name (model.adapter's is "default"); empty: the base model only."""
        return dict(self.adapters) or ({adapters.DEFAULT: self.adapter} if self.adapter is not None else {})

    def adapter_field(self, name: str) -> str:
        """Where the spec gives the adapter `name`, for messages."""
        return "model.adapter" if self.adapter is not None else f"model.adapters.{name}"


class StructuredSpec(_Section):
    """A constraint every completion satisfies (README: structured output): one of json_schema,
    regex, choices, json_object."""

    json_schema: dict[str, Any] | None = Field(
        None,
        description="A JSON schema every completion follows (the subset llguidance implements; a keyword it does "
        "not implement is refused). Its properties are written in the schema's order.",
    )
    regex: str | None = Field(None, description="A regular expression (Rust regex syntax) the whole completion matches.")
    choices: tuple[str, ...] | None = Field(None, description="The completion is exactly one of these strings.")
    json_object: bool = Field(False, description="Any JSON object (OpenAI's response_format json_object).")
    whitespace: Literal["compact", "flexible"] = Field(
        "compact",
        description="JSON without whitespace between tokens (compact), or with any (flexible: vLLM's default; "
        "a weak model may write whitespace until max_new_tokens).",
    )

    @field_validator("json_schema")
    @classmethod
    def _schema_usable(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                text = structured.canonical_json(schema)
            except (TypeError, ValueError) as e:  # YAML values JSON has not (dates, ...)
                raise ValueError(f"not a JSON schema: {e}") from None
            _refuse_problem(structured.Structured("json_schema", text), "llguidance cannot use this schema")
        return schema

    @field_validator("regex")
    @classmethod
    def _regex_usable(cls, regex: str | None) -> str | None:
        if regex is not None:
            _refuse_problem(structured.Structured("regex", regex), "not a regular expression llguidance takes")
        return regex

    @field_validator("choices")
    @classmethod
    def _choices_given(cls, choices: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if choices is not None and not choices:
            raise ValueError("give at least one choice")
        if choices is not None and any(c == "" for c in choices):
            raise ValueError("a choice must not be empty")
        return choices

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredSpec:
        given = self.constraints()
        if len(given) > 1:
            raise ValueError(f"give one of json_schema, regex, choices, json_object: true (got {given})")
        return self

    def constraints(self) -> list[str]:
        """The names of the constraints given."""
        return [n for n in ("json_schema", "regex", "choices") if getattr(self, n) is not None] + (
            ["json_object"] if self.json_object else []
        )


def _refuse_problem(s: structured.Structured, refusal: str) -> None:
    why = structured.problem(s)
    if why is not None:
        raise ValueError(f"{refusal}: {why}")


class ReasoningTags(_Section):
    reference_kind: ClassVar[str] = "`{start, end}`"  # its type in the README's spec reference

    start: str = Field(description="The tag that opens the thinking, e.g. <think>.")
    end: str = Field(description="The tag that closes it, e.g. </think>.")

    @model_validator(mode="after")
    def _two_tags(self) -> ReasoningTags:
        if not self.start or not self.end or self.start == self.end:
            raise ValueError("start and end must be two different, non-empty tags")
        return self


# Most top logprobs a sequence may ask for: OpenAI's limit, and vLLM's default max_logprobs.
MAX_TOP_LOGPROBS = 20


class GenerationSpec(_Section):
    """Sampling parameters, with the names Hugging Face `generate` uses."""

    max_new_tokens: int = Field(128, ge=1, description="Most tokens generated per sequence.")
    do_sample: bool = Field(False, description="Sample; false is greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Divides the logits before sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering.")
    num_return_sequences: int = Field(1, ge=1, description="Samples per row, numbered by sample_index 0..n-1.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalises tokens already in the prompt or output.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size; 0 disables.")
    stop: tuple[str, ...] = Field((), description="Strings that end a completion; not included in the text.")
    seed: int = Field(0, ge=0, description="With the row id and sample_index, fixes each row's sampled text.")
    reasoning: Literal["off", "auto"] | ReasoningTags = Field(
        "off",
        description="Keep a thinking model's reasoning apart: `auto` finds its tags in the tokenizer's chat template "
        "or vocabulary (<think>…</think> and the other pairs vLLM's reasoning parsers know); or give them as "
        "{start, end}. The thinking goes to the reasoning column, its tokens (up to and including the end tag) "
        "to reasoning_tokens; text is the answer after it, leading whitespace dropped. A completion with no "
        "tags, whose prompt did not open the thinking, has no reasoning (null) and its text as it was.",
    )
    structured: StructuredSpec | None = Field(
        None,
        description="Constrain every completion to a JSON schema, a regex or a list of choices (structured output); "
        "a completion that cannot finish within max_new_tokens is a dead letter, never an invalid row.",
    )
    logprobs: bool = Field(
        False,
        description="Keep each generated token's logprob (token_ids, token_logprobs, logprob_sum columns): the "
        "model's log-softmax after any structured constraint, before repetition penalty, temperature, top-k and "
        "top-p (vLLM's raw_logprobs).",
    )
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"Also the K most likely tokens at each step (top_logprobs column). OpenAI's limit, "
        f"{MAX_TOP_LOGPROBS}.",
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("reasoning", mode="before")
    @classmethod
    def _reasoning_form(cls, value: Any) -> Any:
        # One message naming the mistake, instead of pydantic's one per member of the union.
        if value is False:  # YAML reads an unquoted `off` as false
            return "off"
        if isinstance(value, dict):
            try:
                return ReasoningTags.model_validate(value)
            except ValidationError as e:
                where, msg = _where_and_message(e.errors()[0])
                raise ValueError(f"{where}: {msg}" if where else msg) from None
        if not (value in ("off", "auto") or isinstance(value, ReasoningTags)):
            raise ValueError("give off, auto, or the tags as {start, end}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, k: int, info: ValidationInfo) -> int:
        if k > 0 and not info.data.get("logprobs"):
            raise ValueError("needs generation.logprobs: true")
        return k

    @field_validator("num_return_sequences")
    @classmethod
    def _samples_need_sampling(cls, n: int, info: ValidationInfo) -> int:
        if n > 1 and not info.data.get("do_sample"):
            raise ValueError(f"{n} samples per row need do_sample: true (greedy would repeat one text)")
        return n


class OutputSpec(_Section):
    uri: str = Field(description="Directory for data/, errors/, _job.json, _manifest.json, _SUCCESS.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Passed to fsspec for the output.")
    include_prompt: bool = Field(False, description="Add the rendered prompt as a `prompt` column.")
    format: Literal["parquet", "openai-batch"] = Field(
        "parquet",
        description="`openai-batch`: at the end, also write output.jsonl and errors.jsonl, one line per request "
        "shaped like the providers' batch output and error files (bodies are chat completion or completion "
        "objects with all n choices and usage); data/ and errors/ are written as always.",
    )
    report: bool = Field(
        True,
        description="Write the job's report (_report/index.html, report.md, figures) as the job ends, succeeded or "
        "failed; `bulkgen report` builds it at any time.",
    )


@dataclass(frozen=True)
class ReplicaCount:
    """`resources.replicas`: a fixed count, `auto`, or a range MIN..MAX.

    Written in the spec (and back into the job record) as an int, "auto" or
    "MIN..MAX"; what each means on a cluster is decided by jobs/replica_plan.py's
    plan_replicas once the driver has joined it."""

    min: int | None = None  # None: auto
    max: int | None = None

    reference_kind = "int, `auto` or `MIN..MAX`"  # its type in the README's spec reference
    _RANGE = re.compile(r"\s*(\d+)\s*\.\.\s*(\d+)\s*")

    @property
    def auto(self) -> bool:
        return self.min is None

    @property
    def fixed(self) -> int | None:
        """The count when it is one number, else None."""
        return self.min if self.min is not None and self.min == self.max else None

    @classmethod
    def parse(cls, value: Any) -> ReplicaCount:
        if isinstance(value, cls):
            return value
        usage = 'give a count (e.g. 2), "auto", or a range "MIN..MAX" (e.g. "2..8")'
        if isinstance(value, str) and value.strip().lower() == "auto":
            return cls()
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):  # YAML `true` is no count
            if value < 1:
                raise ValueError(f"at least one replica is needed; {usage}")
            return cls(value, value)
        match = cls._RANGE.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(usage)
        low, high = int(match[1]), int(match[2])
        if low < 1 or low > high:
            raise ValueError(f"a range needs 1 <= MIN <= MAX; {usage}")
        return cls(low, high)

    def to_json(self) -> int | str:
        if self.auto:
            return "auto"
        return self.fixed or f"{self.min}..{self.max}"

    def __str__(self) -> str:
        return str(self.to_json())

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler) -> core_schema.CoreSchema:
        # Parsed by hand (three spellings, one error message) and dumped the way it was written,
        # so a recorded spec loads again unchanged (resume).
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(cls.to_json)
        )


class CacheSpec(_Section):
    uri: str = Field(description="Where generated rows are kept for later jobs (any fsspec URL); see the README's cache.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Passed to fsspec for the cache.")


class ResourcesSpec(_Section):
    replicas: ReplicaCount = Field(
        "auto",
        validate_default=True,
        description="Model replicas (Ray actors): a count; `auto`, as many as the cluster holds when the job starts "
        "(its GPUs / num_gpus, or without num_gpus its CPUs / num_cpus); or a range like \"2..8\" for an "
        "autoscaling cluster: MAX are started, those without room wait for new nodes, the job starts with the "
        "first ready. A string or an int; not a mapping.",
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    batch_size: int = Field(32, ge=1, description="Most sequences generated together in one batch.")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="Most tokens (prompt + new) held by one batch; default batch_size * context."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per replica; default num_cpus.")


class ShardsSpec(_Section):
    rows_per_shard: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Input rows per shard (one output file each). `auto`: 1000, fewer for a small input, "
        "so that it still makes 16 shards for the replicas to share (16 rows at least); "
        "decided by the input's row count, so give a number for an input that grows between runs.",
    )
    max_attempts: int = Field(3, ge=1, description="Tries per shard before the job fails.")
    group_by_prefix: Literal["off", "on"] = Field(
        "off",
        description="`on`: rows whose rendered prompts start alike (their first 256 characters; a key shared by "
        "8 rows or more) go into shards of their own, one key per shard, and a key's shards to one replica, so "
        "its engine computes the shared prefix once. Planning then reads the prompt columns once, a row group "
        "at a time; ids, seeds and texts are unchanged, rows are grouped per input file. Parquet input and "
        "output only.",
    )
    max_failed_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of rows allowed in errors/ before the job fails. Default for an openai-batch input: "
        "1.0, as a provider fails no batch for its bad lines (each is an errors.jsonl line, counted in "
        "request_counts.failed).",
    )


class EvaluationSpec(_Section):
    reference_column: str = Field(
        description="Input column with each row's reference text: sentence BLEU and chrF (sacreBLEU) and "
        "ROUGE-1/2/L (rouge-score) per row in data/, corpus scores in the report."
    )

    @field_validator("reference_column")
    @classmethod
    def _column_not_empty(cls, name: str) -> str:
        return _column_name_given(name)


class FiltersSpec(_Section):
    """Quality gates: a sequence a filter drops goes to filtered/ with the filter's name."""

    min_completion_tokens: int | None = Field(None, ge=0, description="Drop shorter completions.")
    max_completion_tokens: int | None = Field(None, ge=0, description="Drop longer completions.")
    min_mean_logprob: float | None = Field(
        None,
        le=0,
        description="Drop completions whose mean token logprob (logprob_sum / completion_tokens) is below this; "
        "needs generation.logprobs.",
    )
    must_match: str | None = Field(None, description="A regular expression a completion must contain.")
    must_not_match: str | None = Field(None, description="A regular expression a completion must not contain.")
    drop_empty: bool = Field(True, description="Drop completions that are empty or only whitespace.")
    drop_prompt_echo: bool = Field(True, description="Drop completions the prompt already contains.")
    deduplicate: Literal["none", "exact", "near"] = Field(
        "near",
        description="Drop repeats among a row's samples and across the job: `exact` (same words), "
        "`near` (MinHash of word 3-grams at near_duplicate_threshold), or `none`. The first one seen stays.",
    )
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of a near duplicate.")

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return pattern

    @model_validator(mode="after")
    def _bounds_leave_room(self) -> FiltersSpec:
        low, high = self.min_completion_tokens, self.max_completion_tokens
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_completion_tokens {low} > max_completion_tokens {high}: every completion would be filtered out"
            )
        return self


# Spec fields that do not decide the output's rows or file names (JobSpec.fingerprint).
NOT_DECISIVE = {
    "name": True,
    "input": {"storage_options"},
    "output": {"storage_options", "uri", "report"},  # the report is about the rows, not of them
    "model": {"engine_options"},  # tuning knobs (memory, compilation), like resources
    "resources": True,
    "cache": True,  # a hit is the row a miss would generate: a cache changes no output
    "shards": {"max_attempts", "max_failed_fraction"},
}
# Bumped when a decisive field's default changes: a spec that leaves the field unset then means another job.
FINGERPRINT_VERSION = 2


class JobSpec(_Section):
    name: str | None = Field(None, description="A label shown in the record and the progress bar.")
    input: InputSpec
    model: ModelSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    output: OutputSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    cache: CacheSpec | None = Field(None, description="A row cache shared across jobs (nightly runs).")
    evaluation: EvaluationSpec | None = Field(None, description="Scores against reference texts.")
    filters: FiltersSpec | None = Field(None, description="Quality gates for augmentation data.")
    shards: ShardsSpec = Field(default_factory=ShardsSpec)

    @model_validator(mode="before")
    @classmethod
    def _batch_error_budget(cls, data: Any) -> Any:
        # The error budget's default depends on input.format: a batch input's bad lines are answered
        # in errors.jsonl, as a provider answers them, instead of failing the job.
        if not (isinstance(data, dict) and isinstance(data.get("input"), dict)):
            return data
        shards = data.get("shards", {})
        batch = InputSpec._infer_format(data["input"]).get("format") == "openai-batch"
        if batch and isinstance(shards, dict) and "max_failed_fraction" not in shards:
            data = {**data, "shards": {**shards, "max_failed_fraction": 1.0}}
        return data

    @model_validator(mode="after")
    def _columns_do_not_collide(self) -> JobSpec:
        generated = set(WRITTEN_COLUMNS)
        id_name = self.input.id_column or DERIVED_ID
        if id_name in generated:
            raise ValueError(f"input.id_column {id_name!r} is the name of a column bulkgen writes; rename it")
        clash = (generated | {id_name}) & set(self.input.pass_through)
        if clash:
            raise ValueError(
                f"input.pass_through names {sorted(clash)}, columns bulkgen writes or may write "
                "(the id column is always written); drop or rename them"
            )
        return self

    @model_validator(mode="after")
    def _adapters_are_chosen(self) -> JobSpec:
        # A batch line chooses its adapter by its body's model, as vLLM's server does.
        column, named = self.input.adapter_column, self.model.adapters
        if named and column is None and self.input.format != rows.OPENAI_BATCH:
            raise ValueError(
                "model.adapters needs input.adapter_column, the column naming each row's adapter "
                "(or give one model.adapter for every row)"
            )
        if column is not None and not named:
            raise ValueError("input.adapter_column chooses among model.adapters, which is empty")
        return self

    @model_validator(mode="after")
    def _output_columns_unique(self) -> JobSpec:
        # A Parquet file with a column twice is one no reader opens; the checks above
        # cover the common clashes, this one every column of every file a job writes.
        for directory, names in output_column_names(self).items():
            twice = sorted(name for name, count in Counter(names).items() if count > 1)
            if twice:
                name = twice[0]
                raise ValueError(
                    f"{directory} would have the column {name!r} twice, from "
                    f"{' and '.join(_column_sources(self, name))}; rename or drop one of them"
                )
        return self

    @model_validator(mode="after")
    def _structured_can_be_kept(self) -> JobSpec:
        g, column = self.generation, self.input.schema_column
        if g.structured is not None and not g.structured.constraints() and column is None:
            raise ValueError(
                "generation.structured names no constraint; give json_schema, regex, choices or json_object: true "
                "(or input.schema_column for per-row schemas)"
            )
        if g.structured is None and column is None:
            return self
        what = "generation.structured" if g.structured is not None else "input.schema_column"
        if g.stop:
            raise ValueError(f"generation.stop could cut a structured completion short of its constraint; drop "
                             f"generation.stop or {what}")  # fmt: skip
        if g.no_repeat_ngram_size:
            raise ValueError(
                f"generation.no_repeat_ngram_size could ban every token the constraint of {what} allows; drop one of them"
            )
        if g.reasoning != "off":
            raise ValueError(f"{what} with generation.reasoning is not supported yet: the constraint would apply to "
                             "the thinking too")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _filters_can_pass(self) -> JobSpec:
        # A batch request's own max_tokens overrides generation.max_new_tokens, so only
        # the spec's inputs have a limit known here.
        low = self.filters.min_completion_tokens if self.filters is not None else None
        limit = self.generation.max_new_tokens
        if low is not None and low > limit and self.input.format != rows.OPENAI_BATCH:
            raise ValueError(
                f"filters.min_completion_tokens {low} > generation.max_new_tokens {limit}: no completion could be "
                "long enough, so every row would be filtered out; lower the one or raise the other"
            )
        return self

    @model_validator(mode="after")
    def _grouping_fits_the_formats(self) -> JobSpec:
        # A batch file is read line by line in order, and output.jsonl is written in input order
        # from the shards in order: neither holds a shard of rows picked across a file.
        if self.shards.group_by_prefix == "on":
            for field, fmt in (("input.format", self.input.format), ("output.format", self.output.format)):
                if fmt == rows.OPENAI_BATCH:
                    raise ValueError(f"shards.group_by_prefix: on needs Parquet rows; {field} is {fmt}: "
                                     "set group_by_prefix: off")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _logprob_filter_has_logprobs(self) -> JobSpec:
        wanted = self.filters.min_mean_logprob if self.filters is not None else None
        if wanted is not None and not self.generation.logprobs:
            raise ValueError(
                f"filters.min_mean_logprob {wanted} needs generation.logprobs: true "
                "(it reads each completion's logprobs)"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of everything that decides the output's rows and file names.

        Resources and storage options are left out: more replicas or new
        credentials must not stop a job from resuming. Fields left at their
        default are left out too, so a field added with a default changes no
        existing spec's fingerprint (a release must still resume the outputs
        of the one before); changing a default changes what an unset field
        means, so it bumps FINGERPRINT_VERSION (tests/jobs/core/test_fingerprint.py
        pins the defaults)."""
        decisive = {**_decisive(self, NOT_DECISIVE), "fingerprint_version": FINGERPRINT_VERSION}
        schema = self.generation.structured.json_schema if self.generation.structured is not None else None
        if schema is not None:
            # Hashed as written: the keys are sorted below, but a schema's property order is the order
            # the completions write them in (llguidance), so two orders are two jobs.
            decisive["generation"]["structured"]["json_schema"] = structured.canonical_json(schema)
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The spec as JSON with storage option values hidden (credentials live there)."""
        data = self.model_dump(mode="json")
        for section in ("input", "output", "cache"):
            if data.get(section) is not None:
                data[section]["storage_options"] = {k: "<redacted>" for k in data[section]["storage_options"]}
        return data


def _decisive(section: BaseModel, exclude: dict[str, Any]) -> dict[str, Any]:
    """The section's fields as JSON, less those excluded and those at their default."""
    decisive = {}
    for name, f in type(section).model_fields.items():
        rule = exclude.get(name)
        if rule is True:
            continue
        value, default = getattr(section, name), f.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            inner = _decisive(value, dict.fromkeys(rule or (), True))
            # A section with defaults counts when a field differs; an optional one (filters) when given at all.
            if inner or default is None:
                decisive[name] = inner
        elif value != default:
            decisive[name] = section.model_dump(mode="json", include={name})[name]
    return decisive


def output_column_names(spec: JobSpec) -> dict[str, list[str]]:
    """The column names of each directory a job writes, as jobs/core/rows.py lays them out."""
    # Names only: every input column the job reads stands in as text.
    schema = pa.schema([pa.field(name, pa.string()) for name in rows.job_input_columns(spec)])
    return {
        f"{directory}/": [f.name for f in columns_of(spec, schema)]
        for directory, columns_of in ((DATA, rows.data_fields), (ERRORS, rows.error_fields), (FILTERED, rows.filtered_fields))
    }


def _column_sources(spec: JobSpec, name: str) -> list[str]:
    """Where an output column's name comes from, for the message about a clash."""
    i = spec.input
    given = {
        "input.id_column" if i.id_column else "the derived id column": [rows.id_name(i)],
        "input.prompt_column": [i.prompt_column],
        "input.prompt_template": list(template_fields(i.prompt_template)) if i.prompt_template else [],
        "input.messages_column": [i.messages_column],
        "input.max_new_tokens_column": [i.max_new_tokens_column],
        "input.adapter_column": [i.adapter_column],
        "input.schema_column": [i.schema_column],
        "input.pass_through": list(i.pass_through),
        "evaluation.reference_column": [spec.evaluation.reference_column] if spec.evaluation is not None else [],
        "the columns bulkgen generates": [f.name for f in rows.GENERATED],
        "output.include_prompt": [rows.PROMPT.name] if spec.output.include_prompt else [],
        "generation.reasoning": [f.name for f in rows.reasoning_fields(spec)],
        "the columns of structured output": (
            [rows.STRUCTURED.name, rows.JSON_PARSED.name] if rows.structured_possible(spec) else []
        ),
        "generation.logprobs": [f.name for f in rows.logprob_fields(rows.top_logprobs_possible(spec))]
        if rows.logprobs_possible(spec) else [],
        "the adapter column of model.adapters": [rows.ADAPTER.name] if spec.model.adapter_set() else [],
        "the error columns of errors/": [f.name for f in rows.ERROR_FIELDS],
        "the evaluation's scores": [f.name for f in rows.EVALUATION_FIELDS] if spec.evaluation is not None else [],
        "the filter column of filtered/": [rows.FILTER.name],
    }
    sources = []
    for source, names in given.items():
        count = names.count(name)
        if count == 1:
            sources.append(source)
        elif count > 1:
            sources.append(f"{source} ({count} times)")
    return sources


def template_fields(template: str) -> tuple[str, ...]:
    """Column names a prompt template refers to, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt_template {template!r} does not parse: {e}") from None
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if conversion not in (None, "r", "s", "a"):  # Python checks it only when formatting: every row would fail
            raise ValueError(f"prompt_template {template!r}: {{{name}!{conversion}}} is no conversion; use !r, !s or !a")
        if format_spec and "{" in format_spec:  # nested fields, e.g. {topic:>{width}}
            names += [n for n in template_fields(format_spec) if n not in names]
        if not name.isidentifier():
            raise ValueError(f"prompt_template {template!r}: use named fields like {{topic}}, not {{{name}}}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"prompt_template {template!r} names no column")
    return tuple(names)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a copy of `data`: a string field takes the value as
    written, any other field (or an unknown one, which validation then names) a YAML value."""
    data = json.loads(json.dumps(data))  # deep copy; spec data is plain YAML
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. generation.max_new_tokens=64")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {part} is not a section")
            node = child
        node[leaf] = raw if _is_text_field(key.split(".")) else _yaml_value(item, raw)
    return data


def _yaml_value(item: str, raw: str) -> Any:
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise SpecError(f"--set {item!r}: the value is not a YAML value ({getattr(e, 'problem', None) or e}); quote it") from None


def _is_text_field(path: list[str]) -> bool:
    """Whether the spec field at `path` holds text (YAML would cut `name=nightly #3` at its comment)."""
    model: type[BaseModel] | None = JobSpec
    for part in path:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return False  # unknown, or inside a mapping (storage_options): parsed as YAML
        model = next((a for a in _alternatives(field.annotation) if _is_section(a)), None)
    alternatives = [a for a in _alternatives(field.annotation) if a is not type(None)]
    return bool(alternatives) and all(a is str or _is_text_literal(a) for a in alternatives)


def _alternatives(annotation) -> tuple:
    """The types a field may hold: those of a union (`str | None`), else the annotation itself."""
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _is_text_literal(annotation) -> bool:
    return get_origin(annotation) is Literal and all(isinstance(v, str) for v in get_args(annotation))


def _absolute_local(uri: str) -> str:
    # Local paths are made absolute here because Ray workers may run in
    # another working directory.
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _where_and_message(err: dict) -> tuple[str, str]:
    """A pydantic error's field path (dotted; empty at the top) and its message as we say it."""
    where = ".".join(str(p) for p in err["loc"])
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return where, msg


def spec_from_dict(data: dict[str, Any], source: str = "job spec") -> JobSpec:
    """Validate spec data; every bad field is named in one SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of sections (input, model, ...), got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where, msg = _where_and_message(err)
            where = where or "(top level)"
            if "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
            lines.append(f"  {where}: {msg}")
        raise SpecError(f"{source} is invalid:\n" + "\n".join(lines)) from None
    model_path = spec.model.path
    if os.path.exists(os.path.expanduser(model_path)):
        model_path = os.path.abspath(os.path.expanduser(model_path))
    model = {"path": model_path}
    if spec.model.adapter is not None:
        model["adapter"] = _identified(spec.model.adapter)
    if spec.model.adapters:
        model["adapters"] = {name: _identified(a) for name, a in spec.model.adapters.items()}
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"uri": _absolute_local(spec.input.uri)}),
            "output": spec.output.model_copy(update={"uri": _absolute_local(spec.output.uri)}),
            "model": spec.model.model_copy(update=model),
        }
    )


def _identified(adapter: AdapterSpec) -> AdapterSpec:
    """The adapter at an absolute path, with its files' SHA-256 where the spec gave none (a recorded
    spec keeps its own: a resume then sees a changed adapter). A directory that is not there keeps
    no hash; the driver's checks refuse it (jobs/preflight.check_adapters)."""
    path = _absolute_local(adapter.path)
    digest = adapter.sha256
    if digest is None and os.path.isdir(path):
        digest = adapters.files_sha256(path)
    return adapter.model_copy(update={"path": path, "sha256": digest})


def load_spec(path: str | os.PathLike, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of sections (input, model, ...)")
    return spec_from_dict(apply_overrides(data, list(overrides)), source=str(path))


def reference_markdown() -> str:
    """The spec reference table in the README, generated from the field docs above."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for section_name, section in JobSpec.model_fields.items():
        # An optional section (cache) is documented by its fields, like the others.
        model = next((a for a in (section.annotation, *getattr(section.annotation, "__args__", ())) if _is_section(a)), None)
        if model is None:
            lines.append(_reference_row(section_name, section))
            continue
        lines += _section_rows(section_name, model)
    return "\n".join(lines)


def _section_rows(path: str, model: type[BaseModel]) -> list[str]:
    """A section's rows; an optional section inside it (generation.structured) has its own row, then
    its fields'. (A section that is one form of a field, reasoning's {start, end}, is that field's type.)"""
    rows = []
    for name, f in model.model_fields.items():
        forms = [a for a in _alternatives(f.annotation) if a is not type(None)]
        inner = forms[0] if len(forms) == 1 and _is_section(forms[0]) else None
        if inner is None:
            rows.append(_reference_row(f"{path}.{name}", f))
        else:
            rows.append(_reference_row(f"{path}.{name}", f, kind="section"))
            rows += _section_rows(f"{path}.{name}", inner)
    return rows


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _reference_row(path: str, f, kind: str | None = None) -> str:
    if kind is None and isinstance(f.json_schema_extra, dict) and "reference_kind" in f.json_schema_extra:
        kind = f.json_schema_extra["reference_kind"]
    kind = kind or _reference_kind(f.annotation)
    if f.is_required():
        default = "required"
    elif f.default_factory is not None:
        default = f"`{f.default_factory()!r}`"
    else:
        default = f"`{f.default!r}`"
    return f"| `{path}` | {kind} | {default} | {f.description or ''} |"


def _reference_kind(annotation) -> str:
    """A field's type as the reference writes it."""
    choices = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is Literal:
        return " or ".join(f"`{c}`" for c in choices)
    if getattr(annotation, "__origin__", None) is tuple:
        return "list of str"
    if hasattr(annotation, "reference_kind"):
        return annotation.reference_kind
    if any(getattr(c, "__origin__", None) is Literal for c in choices):  # e.g. int or `auto`
        return " or ".join(
            " or ".join(f"`{v}`" for v in c.__args__) if getattr(c, "__origin__", None) is Literal
            else getattr(c, "reference_kind", None)  # a section written inline: `{start, end}`
            or (c.__origin__ if hasattr(c, "__metadata__") else c).__name__  # Annotated[int, ...]: int
            for c in choices
        )  # fmt: skip
    kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return kind.replace(" | ", " or ").replace("NoneType", "None")


if __name__ == "__main__":
    print(reference_markdown())
