"""Everything that can be checked before a shard runs (`bulkgen validate`, and `run` while Ray
starts and the replicas load: check_before_launch's part before any replica is launched).

The output (reachable, a directory that takes new directories or creatable,
not inside the input), the input (files, schema, column types, unique ids, a
prompt template's formats against its first row), the model (files, config,
attention implementation, architecture and weight names on the meta device,
tokenizer), and for `bulkgen validate` a scan of the prompts: rendered and
tokenized on this machine, measured against the model's context and the job's
error budget. Failures raise BadInput.
"""

from __future__ import annotations

import os
import string
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.compute as pc

from jobs import preflight
from jobs.core import storage, structured
from jobs.core.errors import InputError, OutputError
from jobs.core.model import load_tokenizer
from jobs.core.plan import InputFile, Shard, plan, rows_per_shard
from jobs.core.prompts import TEMPLATE_ERROR, RowError, decode_rows, render_prompt
from jobs.core.row_prompt import build_prompt
from jobs.core.rows import derived_id, read_shard_rows, row_ids
from jobs.core.spec import JobSpec
from jobs.dataset import (
    Dataset,
    check_unique_ids,
    glob_root,
    is_glob,
    is_text,
    iter_column,
    iter_row_groups,
    open_dataset,
    plan_shards,
)
from jobs.output import check_output_takes


@dataclass(frozen=True)
class Checked:
    """What the checks of the input and the model found."""

    input_rows: int
    model: dict  # identity: path, revision, dtype, weights hash
    context: int | None  # None where the replicas check the model (check_input_and_model)
    output_rows: int  # (id, sample_index) rows the job writes: a batch request asks for its own n
    files: tuple[InputFile, ...]  # the input files whose footers were read


@dataclass(frozen=True)
class Validated(Checked):
    """`bulkgen validate`'s answer: the checks, and the shards a first run would plan."""

    rows_per_shard: int  # shards.rows_per_shard, `auto` decided
    shards: list[Shard]


def validate(spec: JobSpec) -> Validated:
    """Every check that needs no replica: output (and that a run could take it), input, ids,
    model files, tokenizer; and the plan a first run would make of this input."""
    check_output_usable(spec)
    check_output_takes(spec)
    check_before_launch(spec)
    checked = check_input_and_model(spec)
    per_shard = rows_per_shard(spec.shards.rows_per_shard, checked.input_rows)
    return Validated(**vars(checked), rows_per_shard=per_shard, shards=plan_shards(spec, checked.files, per_shard))


def check_before_launch(spec: JobSpec) -> None:
    """The checks that must pass before any process loads the model (a replica may start
    while the rest of validation runs): the engine, the attention implementation, where
    the weights come from and what loading them may run (pickle, trust_remote_code), the
    adapters' files and their fit. Cheap: torch and transformers only for adapters (their fit,
    against a meta model) or an attn_implementation to look up. Run once, before check_input_and_model."""
    preflight.check_engine(spec)
    preflight.check_attn_implementation(spec)
    preflight.check_model_source(spec)
    preflight.check_adapters(spec)


def check_input_and_model(spec: JobSpec, dataset: Dataset | None = None, replicas_check_model: bool = False) -> Checked:
    """The checks after the output is known usable (`run` claims it in between, to record a failure)
    and check_before_launch has passed; `dataset`: the input, if the caller opened it already.
    They plan nothing: the driver plans (or re-reads the plan it pinned) once they pass.

    `replicas_check_model` (replicas_check_the_model): the replicas loading beside these checks
    find a model that does not load (config, architecture, missing weights) and fail the job as
    bad input, so the meta model is not built here and the tokenizer is loaded only for the checks
    that read it; `context` is then None. Both import torch and transformers: ~3 core-seconds that
    the replicas, importing the same, need on a 2-core machine."""
    dataset = dataset or open_dataset(spec.input)
    check_unique_ids(spec.input, dataset)
    check_adapter_names(spec, dataset)
    check_row_schemas(spec, dataset)
    check_reference_column(spec, dataset.schema)
    check_template_renders(spec, dataset.files)
    context = None if replicas_check_model else preflight.check_model_loadable(spec)
    if not replicas_check_model or preflight.reads_tokenizer(spec):
        tokenizer = load_tokenizer(spec.model)
        preflight.check_tokenizer(spec, tokenizer)
        preflight.check_reasoning(spec, tokenizer)
    output_rows = dataset.output_rows(spec.generation.num_return_sequences)
    identity = preflight.model_identity(spec)
    return Checked(dataset.num_rows, identity, context, output_rows, tuple(dataset.files))


def replicas_check_the_model(spec: JobSpec, address: str | None) -> bool:
    """Whether `run` leaves the model's load checks to its replicas: where it starts them on this
    machine's Ray (no address, no RAY_ADDRESS), so a model found broken as they load costs seconds,
    not a cluster's nodes; and where the engine that loads it says what is missing (transformers,
    also `auto`'s fallback when vLLM refuses a checkpoint): not on model.engine vllm."""
    return not (address or os.environ.get("RAY_ADDRESS")) and spec.model.engine != "vllm"


def check_adapter_names(spec: JobSpec, dataset: Dataset) -> None:
    """Every value of input.adapter_column is null (the base model) or a name of model.adapters.
    Streams the column a row group at a time, as the ids are checked."""
    column = spec.input.adapter_column
    if column is None:
        return
    known = sorted(spec.model.adapters)
    for values, file, offset in iter_column(spec.input, dataset, "adapter_column"):
        unknown = [name for name in pc.unique(values.drop_null()).to_pylist() if name not in known]
        if unknown:
            index = pc.index(values, unknown[0]).as_py()
            shard = Shard(0, file.url, file.relpath, offset + index, offset + index + 1)
            row_id = row_ids(spec.input, shard, read_shard_rows(spec, shard))[0]
            raise InputError(
                f"input.adapter_column {column!r}: row {row_id!r} of {file.relpath} names adapter {unknown[0]!r}; "
                f"model.adapters has {known}"
            )


def check_reference_column(spec: JobSpec, schema) -> None:
    """evaluation.reference_column must be a text column of the input."""
    column = spec.evaluation.reference_column if spec.evaluation is not None else None
    if column is None:
        return
    if column not in schema.names:
        raise InputError(
            f"evaluation.reference_column names column {column!r}, which the input does not have; "
            f"its columns are {sorted(schema.names)}"
        )
    if not is_text(schema.field(column).type):
        raise InputError(f"evaluation.reference_column {column!r} has type {schema.field(column).type}; expected text")


def check_row_schemas(spec: JobSpec, dataset: Dataset) -> None:
    """Every row's schema (input.schema_column) must be a JSON schema llguidance can use: a bad
    one fails its row on every try. Streams the column one row group at a time and checks each
    distinct schema once (a row's null schema takes generation.structured's)."""
    column = spec.input.schema_column
    if column is None:
        return
    checked: set[str] = set()
    ids = [spec.input.id_column] if spec.input.id_column else []
    for table, file, offset in iter_row_groups(spec.input, dataset, [column, *ids], f"input.schema_column {column!r}"):
        rows, _ = decode_rows(table)  # a string that is not UTF-8 is None here: its row's own dead letter
        for index, row in enumerate(rows):
            text = row[column]
            if text is None or text in checked:
                continue
            try:
                structured.row_schema(text)
            except ValueError as e:
                row_id = row[spec.input.id_column] if spec.input.id_column else derived_id(file.relpath, offset + index)
                raise InputError(
                    f"input.schema_column {column!r}: row {row_id!r} of {file.relpath} {e}; fix its schema, or "
                    "leave it null for generation.structured's constraint"
                ) from None
            checked.add(text)


_TEMPLATE_PROBE_ROWS = 16  # rows read to find one with every template field set


def check_template_renders(spec: JobSpec, files: Sequence[InputFile]) -> None:
    """A prompt_template with a format spec or conversion ({n:d}, {x!r}) must render the first
    input row that has every field set: a column's type is the same in every row, so a spec
    that fails one row (`{topic:d}` on text) fails them all, and the job would end in dead letters."""
    template = spec.input.prompt_template
    first = min((f for f in files if f.num_rows), key=lambda f: f.relpath, default=None)  # the plan's first rows
    if template is None or first is None or not _formats_values(template):
        return
    shard = Shard(0, first.url, first.relpath, 0, min(first.num_rows, _TEMPLATE_PROBE_ROWS))
    table = read_shard_rows(spec, shard)
    ids = row_ids(spec.input, shard, table)
    columns = spec.input.source_columns()
    rows, _ = decode_rows(table)  # a string that is not UTF-8 is None here: its row's own dead letter
    for i, row in enumerate(rows):
        if any(row[c] is None for c in columns):
            continue  # a null is that row's own dead letter, not the template's fault
        try:
            render_prompt(spec.input, row, tokenizer=None)
        except RowError as e:
            if e.code == TEMPLATE_ERROR:
                raise InputError(
                    f"input.prompt_template {template!r} cannot render row {ids[i]!r} of {first.relpath} "
                    f"({e}), so no row could; fix its format specs for the columns' types "
                    f"({', '.join(f'{c}: {table.schema.field(c).type}' for c in columns)})"
                ) from None
        return  # one complete row decides


def _formats_values(template: str) -> bool:
    """Whether any field of the template has a format spec or a conversion (plain {x} never fails)."""
    return any(name is not None and (spec or conversion) for _, name, spec, conversion in string.Formatter().parse(template))


def check_output_usable(spec: JobSpec) -> None:
    """The output must be reachable and a directory, or creatable as one, and apart from the input.
    Runs before the output is claimed, so a refused output gets nothing written, not even _job.json."""
    uri = spec.output.uri
    with storage.reaching("output.uri", uri, OutputError):
        fs, path = fsspec.core.url_to_fs(uri, **spec.output.storage_options)
        if fs.isfile(path):
            raise OutputError(f"output.uri {uri!r} is a file; give a directory for data/, errors/ and _job.json")
        if not fs.isdir(path):
            _check_creatable(fs, path, uri)
        elif _is_local(fs):
            _probe_local_directory(path, f"output.uri {uri!r} cannot be written")
    check_output_apart(spec)
    check_cache_usable(spec)


def check_cache_usable(spec: JobSpec) -> None:
    """A row cache must be a directory (or nothing yet: its first entry creates it) that
    every replica can reach."""
    if spec.cache is None:
        return
    uri = spec.cache.uri
    with storage.reaching("cache.uri", uri, OutputError):
        fs, path = fsspec.core.url_to_fs(uri, **spec.cache.storage_options)
        if fs.isfile(path):
            raise OutputError(f"cache.uri {uri!r} is a file; give a directory")
    if storage.process_local(uri, spec.cache.storage_options):
        raise OutputError(f"cache.uri {uri!r}: memory:// lives in one process, and replicas run in others")


def check_output_apart(spec: JobSpec) -> None:
    """The output must be neither the input nor inside a directory (or glob) input's root.
    Decided from the URIs alone: a file has nothing inside it, so an output under input.uri
    means a directory input (or one that does not exist, which the input checks report)."""
    uri = spec.output.uri
    fs, path = fsspec.core.url_to_fs(uri, **spec.output.storage_options)
    output_url = fs.unstrip_protocol(path).rstrip("/")
    try:
        in_fs, in_path = fsspec.core.url_to_fs(spec.input.uri, **spec.input.storage_options)
    except Exception:
        return  # an input that cannot be resolved is reported (and recorded) by the input checks
    root = in_fs.unstrip_protocol(glob_root(in_path) if is_glob(in_path) else in_path).rstrip("/")
    # A directory or glob input would list the output's own Parquet files on the next run.
    if output_url == root or output_url.startswith(root + "/"):
        raise OutputError(
            f"output.uri {uri!r} is inside the input's root {root!r}, where the next run would read "
            "its results as prompts; put the output elsewhere"
        )


def _check_creatable(fs, path: str, uri: str) -> None:
    """An output that does not exist yet: its nearest existing ancestor must be a writable directory."""
    parent = path
    while not fs.exists(parent):
        up = fs._parent(parent)
        if up in (parent, "", fs.root_marker):
            raise OutputError(f"output.uri {uri!r}: neither it nor any directory above it exists (no such bucket?)")
        parent = up
    if not fs.isdir(parent):
        raise OutputError(f"output.uri {uri!r} cannot be created: {fs.unstrip_protocol(parent)} is a file")
    if _is_local(fs):
        _probe_local_directory(parent, f"output.uri {uri!r} cannot be created")


def _is_local(fs) -> bool:
    return "file" in fs.protocol


def _probe_local_directory(directory: str, failure: str) -> None:
    """Make and remove a directory in `directory`: the one real test of creating the output's
    directories (os.access says yes to root on /proc and /sys, where mkdir fails)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bulkgen-probe-", dir=directory))
    except OSError as e:
        raise OutputError(
            f"{failure}: {directory} takes no new directories ({e.strerror or e}); give a writable directory"
        ) from None


# -- the report of `bulkgen validate` --------------------------------------------------


@dataclass
class Report:
    rows: int
    shards: int
    files: int
    context: int | None
    model: str
    max_failed_fraction: float = 0.0  # shards.max_failed_fraction
    prompt_tokens: list[int] = field(default_factory=list)
    would_fail: Counter = field(default_factory=Counter)  # error code -> rows
    examples: dict = field(default_factory=dict)  # error code -> (row id, message)
    scanned: int = 0

    def render(self) -> str:
        lines = [
            f"input:   {self.rows} rows in {self.files} files -> {self.shards} shards",
            f"model:   {self.model} (context {self.context or 'unknown'} tokens)",
        ]
        if self.prompt_tokens:
            t = np.array(self.prompt_tokens)
            p50, p95 = np.percentile(t, [50, 95])
            lines.append(
                f"prompts: {self.scanned} scanned; tokens min {t.min()} / p50 {p50:.0f} / p95 {p95:.0f} / max {t.max()}"
            )
        if self.would_fail:
            lines.append(f"would fail: {sum(self.would_fail.values())} rows")
            for code, count in self.would_fail.most_common():
                row_id, message = self.examples[code]
                lines.append(f"  {code}: {count} rows, e.g. {row_id}: {message}")
        else:
            lines.append("would fail: none")
        return "\n".join(lines)

    def check_error_budget(self) -> None:
        """Raise InputError when the rows the scan found failing already exceed the job's error budget
        (of all its rows, so a partial scan refuses only what the run would surely fail on)."""
        failing = sum(self.would_fail.values())
        if not self.rows or failing / self.rows <= self.max_failed_fraction:
            return
        raise InputError(
            f"{failing} of {self.rows} input rows would fail ({failing / self.rows:.2%}), over "
            f"shards.max_failed_fraction={self.max_failed_fraction}, so the run would fail; fix those rows "
            "(see the examples above) or raise shards.max_failed_fraction"
        )


def validate_report(spec: JobSpec, max_rows: int | None = None) -> Report:
    """validate(), then every prompt (up to max_rows) built as a replica would build it."""
    checked = validate(spec)
    tokenizer = load_tokenizer(spec.model)
    report = Report(
        rows=checked.input_rows,
        shards=len(checked.shards),
        files=len({s.url for s in checked.shards}),
        context=checked.context,
        model=spec.model.path,
        max_failed_fraction=spec.shards.max_failed_fraction,
    )
    # Row ranges, whatever the plan: the scan judges rows, and a range reads each row group once.
    for shard in plan(checked.files, checked.rows_per_shard):
        table = read_shard_rows(spec, shard)  # one shard's rows at a time
        ids = row_ids(spec.input, shard, table)
        rows, undecodable = decode_rows(table)
        for i, row in enumerate(rows):
            if max_rows is not None and report.scanned >= max_rows:
                return report
            report.scanned += 1
            try:
                if i in undecodable:
                    raise undecodable[i]
                _, token_ids = build_prompt(spec.input, row, tokenizer, checked.context)
                report.prompt_tokens.append(len(token_ids))
            except RowError as e:
                report.would_fail[e.code] += 1
                report.examples.setdefault(e.code, (ids[i], str(e)))
    return report
