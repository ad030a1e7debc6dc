"""output.format: openai-batch — output.jsonl and errors.jsonl, written at the job's end from the committed shards.

One line per request (input row): in output.jsonl when every sample it asked
for was generated (those a filter dropped are left out of its choices), in
errors.jsonl (with its first error) when any sample is in errors/, or with
code `filtered` when filters dropped all of its samples: every request
appears in exactly one of the two. The lines come
from the committed data/ and errors/ files, read one shard at a time, in input
order: the driver holds one shard's rows, never the dataset. Each file is
written under a temporary name and moved into place whole before the manifest
and _SUCCESS; finalizing again (a resume) writes the same lines. A job over its
error budget (shards.max_failed_fraction) writes them too before it fails: a
provider's batch ends with both files, however many of its requests failed.

Also `request_counts`: the providers' {total, completed, failed} for `bulkgen status --json`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

import fsspec
import pyarrow.compute as pc

from jobs.core import storage
from jobs.core.layout import BATCH_ERRORS, BATCH_OUTPUT, DATA
from jobs.core.model import load_tokenizer
from jobs.core.openai_batch import CHAT, COMPLETIONS, TokenOf, error_line, response_line
from jobs.core.protocol import CommitRecord
from jobs.core.rows import DERIVED_ID, OPENAI_BATCH, custom_id_of, id_name
from jobs.core.spec import JobSpec, output_column_names
from jobs.output import OutputDir

if TYPE_CHECKING:
    from jobs.record import JobRecord

log = logging.getLogger(__name__)

_DATA_COLUMNS = ["sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
# data/ columns a response line carries where the job writes them (logprobs, reasoning).
_OPTIONAL_COLUMNS = ["token_ids", "token_logprobs", "top_logprobs", "reasoning", "reasoning_tokens"]
_ERROR_COLUMNS = ["sample_index", "error_code", "error"]
_FILTERED_COLUMNS = ["sample_index", "filter"]
FILTERED = "filtered"  # errors.jsonl's code for a request whose every sample a filter dropped


def write_batch_files(spec: JobSpec, out: OutputDir, commits: dict[int, CommitRecord]) -> None:
    """Write output.jsonl and errors.jsonl from the committed shards (`commits`: by shard index),
    when the spec asks for them."""
    if spec.output.format != OPENAI_BATCH:
        return
    key = id_name(spec.input)
    batch_input = spec.input.format == OPENAI_BATCH
    written_columns = output_column_names(spec)[f"{DATA}/"]
    optional = [c for c in _OPTIONAL_COLUMNS if c in written_columns]
    data_columns = [key, *_DATA_COLUMNS, *(["url"] if batch_input else [])]
    token_of = token_reader(spec) if "token_logprobs" in optional else None
    error_columns = [key, *_ERROR_COLUMNS, *(["line", "request"] if batch_input else [])]
    created, written = int(time.time()), [0, 0]
    with _whole_file(out, BATCH_OUTPUT) as responses, _whole_file(out, BATCH_ERRORS) as failures:
        for index in sorted(commits):
            commit, opts = commits[index], out.storage_options
            data = _read_data(out.url(commit.data), opts, data_columns, optional)
            errors = []
            if commit.errors:
                errors = storage.read_parquet(out.url(commit.errors), opts, columns=error_columns).to_pylist()
            filtered = []
            if commit.filtered:
                columns = [key, *_FILTERED_COLUMNS, *(["line", "request"] if batch_input else [])]
                filtered = storage.read_parquet(out.url(commit.filtered), opts, columns=columns).to_pylist()
            ok, failed = shard_lines(spec, data, errors, created, filtered, token_of)
            for target, lines, count in ((responses, ok, 0), (failures, failed, 1)):
                target.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
                written[count] += len(lines)
    log.info("wrote %s (%d requests) and %s (%d)", out.url(BATCH_OUTPUT), written[0], out.url(BATCH_ERRORS), written[1])


def _read_data(url: str, storage_options: dict, columns: list[str], optional: list[str]) -> list[dict]:
    """A data/ file's rows: `columns`, and those of `optional` it has (a shard committed by a
    bulkgen that wrote no logprob or reasoning columns still answers, without them)."""
    data = storage.open_parquet(io.BytesIO(storage.read_bytes(url, storage_options)))
    present = set(data.schema_arrow.names)
    return data.read(columns=columns + [c for c in optional if c in present], use_threads=False).to_pylist()


def token_reader(spec: JobSpec) -> TokenOf:
    """A token id's text and bytes, as the providers' logprobs name a token: the bytes are exact
    where the text of a token that is part of a character is not."""
    tokenizer = load_tokenizer(spec.model)
    try:
        import llguidance.hf

        exact = llguidance.hf.from_tokenizer(tokenizer)
        raw = lambda token_id: list(exact.decode_bytes([token_id]))  # noqa: E731
    except Exception:  # a slow tokenizer: its text's bytes
        raw = None

    @functools.lru_cache(maxsize=65536)
    def token_of(token_id: int) -> tuple[str, list[int]]:
        text = tokenizer.decode([token_id])
        return text, raw(token_id) if raw is not None else list(text.encode())

    return token_of


def shard_lines(
    spec: JobSpec,
    data: list[dict],
    errors: list[dict],
    created: int,
    filtered: list[dict] = (),
    token_of: TokenOf | None = None,
) -> tuple[list[dict], list[dict]]:
    """One shard's (output lines, error lines), in input order; `data`/`errors`/`filtered`: its rows;
    `token_of`: names the tokens of the rows' logprobs (token_reader)."""
    key = id_name(spec.input)
    failed: dict = {}
    for row in errors:
        failed.setdefault(row[key], row)  # a request's first error speaks for it
    kept = {row[key] for row in data}
    for row in filtered:
        if row[key] not in kept and row[key] not in failed:  # nothing of it is left to answer with
            failed[row[key]] = {
                **row,
                "error_code": FILTERED,
                "error": f"every sample was dropped by a quality filter (the first by {row['filter']})",
            }
    generated: dict = {}
    for row in data:
        if row[key] not in failed:  # a request half generated is a failed request, as at the providers
            generated.setdefault(row[key], []).append(row)
    model, fingerprint = spec.model.path, spec.fingerprint()
    responses = [
        response_line(str(k), _url(spec, rows[0]), rows, rows[0]["prompt_tokens"], model, fingerprint, created, token_of)
        for k, rows in generated.items()
    ]
    failures = [
        error_line(_custom_id(spec, k, row), row["error_code"], row["error"], row.get("line"), fingerprint, str(k))
        for k, row in failed.items()
    ]
    return responses, failures


def _url(spec: JobSpec, row: dict) -> str:
    """The endpoint a row answers: its line's url, or for a Parquet input the one its prompt source matches."""
    if spec.input.format == OPENAI_BATCH:
        return row["url"]
    return CHAT if spec.input.messages_column else COMPLETIONS


def _custom_id(spec: JobSpec, key, row: dict) -> str | None:
    # A batch line whose custom_id cannot be read has a derived row id, which is no custom_id of the user's.
    if spec.input.format == OPENAI_BATCH:
        return custom_id_of(row["request"])
    return str(key)


@contextlib.contextmanager
def _whole_file(out: OutputDir, name: str):
    """Write `name` under a temporary name, then move it into place: a reader sees a whole file."""
    final = out.url(name)
    temporary = f"{final}.tmp-{secrets.token_hex(6)}"
    try:
        with fsspec.open(temporary, "wb", **out.storage_options) as f:
            yield f
        storage.move(temporary, final, out.storage_options)
    except BaseException:
        with contextlib.suppress(Exception):
            fs, path = fsspec.core.url_to_fs(temporary, **out.storage_options)
            fs.rm(path)
        raise


def request_counts(output_uri: str, record: JobRecord, storage_options: dict | None = None) -> dict[str, int]:
    """The providers' request_counts for a job: a request is an input row (a batch line);
    failed, any of its samples in errors/; completed, its shard committed and none failed."""
    out = OutputDir(output_uri, storage_options or {})
    key = record.spec.get("input", {}).get("id_column") or DERIVED_ID
    commits = out.commit_records()
    failed = 0
    for commit in commits.values():  # a request's samples all live in its one shard
        errors = _ids(out, commit.errors, key)
        failed += len(errors)
        if commit.filtered:  # a request a filter emptied is failed too (errors.jsonl: filtered)
            failed += len(_ids(out, commit.filtered, key) - _ids(out, commit.data, key) - errors)
    committed = sum(c.input_rows for c in commits.values())
    return {"total": record.counts.input_rows, "completed": committed - failed, "failed": failed}


def _ids(out: OutputDir, relpath: str | None, key: str) -> set:
    """The distinct row ids in one of a shard's files (none when it has no such file)."""
    if not relpath:
        return set()
    return set(pc.unique(storage.read_parquet(out.url(relpath), out.storage_options, columns=[key]).column(0)).to_pylist())
