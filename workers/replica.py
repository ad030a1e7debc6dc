"""A model replica: loads the model once, then turns shards into staged output files.

A plain class; the driver wraps it with `ray.remote` where it launches it.
Rows travel storage -> replica -> storage; only small stats go back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from jobs.plan import Shard
from jobs.spec import JobSpec
from workers import storage
from workers.prompts import GENERATION_ERROR, PROMPT_TOO_LONG, RowError, render_prompt, tokenize_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardResult:
    """What a replica reports for one shard attempt: counts and where the files are staged."""

    shard: int
    attempt: str
    rows: int
    samples_ok: int
    samples_failed: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    data_url: str
    errors_url: str | None
    # Set only when the output is process-local (memory://): the staged files'
    # bytes, for the driver to write, since this process cannot reach its storage.
    inline_files: dict[str, bytes] | None = None


def row_seed(job_seed: int, row_id, sample_index: int) -> int:
    """A sequence's sampling seed: a function of the job seed, row id and sample index only."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in int64


def staging_dir(output_uri: str, shard: Shard, attempt: str) -> str:
    return f"{output_uri.rstrip('/')}/_staging/{shard.name}/{attempt}"


class Replica:
    def __init__(self, spec: JobSpec, file_metadata: dict[str, str]):
        self.spec = spec
        self.file_metadata = {k.encode(): v.encode() for k, v in file_metadata.items()}
        self.model, self.tokenizer = load_model(spec)
        self.context = context_length(self.model)
        from workers.engine import Engine, SamplingParams

        gen = spec.generation
        params = SamplingParams(
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.do_sample,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            stop=gen.stop,
        )
        res = spec.resources
        budget = res.max_batch_tokens or res.batch_size * (self.context or 2048)
        self.engine = Engine(self.model, self.tokenizer, params, res.batch_size, budget)

    def info(self) -> dict:
        """Facts about this replica for the job record (and for tests: its pid)."""
        return {
            "pid": os.getpid(),
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "commit_hash": getattr(self.model.config, "_commit_hash", None),
            "context_length": self.context,
        }

    def process(self, shard: Shard, attempt: str, rows: pa.Table | None = None) -> ShardResult:
        """Generate one shard and stage its data (and errors) files under _staging/.

        `rows` is given only when the input is process-local (memory://) and
        the driver had to read them."""
        started = time.perf_counter()
        inp = self.spec.input
        table = rows if rows is not None else read_shard_rows(self.spec, shard)
        ids = (
            table.column(inp.id_column).to_pylist()
            if inp.id_column
            else [f"{shard.relpath}:{i}" for i in range(shard.start, shard.stop)]
        )
        rows = table.to_pylist()
        n = self.spec.generation.num_return_sequences

        prompts: dict[int, tuple[str, list[int]]] = {}
        failures: dict[int, RowError] = {}
        for i, row in enumerate(rows):
            try:
                text = render_prompt(inp, row, self.tokenizer)
                token_ids = tokenize_prompt(inp, text, self.tokenizer)
                if self.context and len(token_ids) >= self.context:
                    raise RowError(
                        PROMPT_TOO_LONG, f"prompt is {len(token_ids)} tokens; the model's context is {self.context}"
                    )
                prompts[i] = (text, token_ids)
            except RowError as e:
                failures[i] = e

        from workers.engine import Request

        max_new = self.spec.generation.max_new_tokens
        requests = [
            Request(
                key=i * n + s,
                prompt_ids=tuple(token_ids),
                seed=row_seed(self.spec.generation.seed, ids[i], s),
                max_new_tokens=min(max_new, self.context - len(token_ids)) if self.context else max_new,
            )
            for i, (_, token_ids) in prompts.items()
            for s in range(n)
        ]
        completions = {c.key: c for c in self.engine.generate(requests)}

        out, err = _OutputRows(), _OutputRows()
        for i, row in enumerate(rows):
            for s in range(n):
                if i in failures:
                    err.add(id=ids[i], sample_index=s, error_code=failures[i].code, error=str(failures[i]), row=row)
                    continue
                c = completions[i * n + s]
                out.add(
                    id=ids[i],
                    sample_index=s,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    prompt_tokens=len(prompts[i][1]),
                    completion_tokens=len(c.token_ids),
                    prompt=prompts[i][0],
                    row=row,
                )

        where = staging_dir(self.spec.output.uri, shard, attempt)
        staged = {f"{where}/data.parquet": storage.parquet_bytes(self._data_table(out, table.schema))}
        if err.count:
            staged[f"{where}/errors.parquet"] = storage.parquet_bytes(self._errors_table(err, table.schema))
        inline = storage.process_local(self.spec.output.uri, self.spec.output.storage_options)
        if not inline:
            for url, data in staged.items():
                storage.write_bytes(url, data, self.spec.output.storage_options)
        return ShardResult(
            shard=shard.index,
            attempt=attempt,
            rows=len(rows),
            samples_ok=out.count,
            samples_failed=err.count,
            prompt_tokens=sum(out.columns.get("prompt_tokens", [])),
            completion_tokens=sum(out.columns.get("completion_tokens", [])),
            seconds=time.perf_counter() - started,
            data_url=f"{where}/data.parquet",
            errors_url=f"{where}/errors.parquet" if err.count else None,
            inline_files=staged if inline else None,
        )

    def _id_field(self, input_schema: pa.Schema) -> pa.Field:
        id_column = self.spec.input.id_column
        return input_schema.field(id_column) if id_column else pa.field("id", pa.string())

    def _data_table(self, out: _OutputRows, input_schema: pa.Schema) -> pa.Table:
        fields = [
            self._id_field(input_schema),
            pa.field("sample_index", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("completion_tokens", pa.int32()),
        ]
        if self.spec.output.include_prompt:
            fields.append(pa.field("prompt", pa.string()))
        fields += [input_schema.field(c) for c in self.spec.input.pass_through]
        return out.to_table(fields, self.file_metadata)

    def _errors_table(self, err: _OutputRows, input_schema: pa.Schema) -> pa.Table:
        id_field = self._id_field(input_schema)
        fields = [
            id_field,
            pa.field("sample_index", pa.int32()),
            pa.field("error_code", pa.string()),
            pa.field("error", pa.string()),
        ]
        fields += [input_schema.field(c) for c in _input_columns(self.spec) if c != id_field.name]
        return err.to_table(fields, self.file_metadata)


class _OutputRows:
    """Column-wise accumulator for output rows; input columns come from `row`."""

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.count = 0
        self._rows: list[dict] = []

    def add(self, *, id, row: dict, **values) -> None:
        self._rows.append(row)
        self.columns.setdefault("id", []).append(id)
        for k, v in values.items():
            self.columns.setdefault(k, []).append(v)
        self.count += 1

    def to_table(self, fields: list[pa.Field], metadata: dict[bytes, bytes]) -> pa.Table:
        arrays = []
        for i, f in enumerate(fields):
            if i == 0:  # the id column, whatever its name
                values = self.columns.get("id", [])
            elif f.name in self.columns:
                values = self.columns[f.name]
            else:  # an input column carried through
                values = [r[f.name] for r in self._rows]
            arrays.append(pa.array(values, type=f.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))


def read_shard_rows(spec: JobSpec, shard: Shard) -> pa.Table:
    """The input columns the job uses, for the shard's row range."""
    inp = spec.input
    return storage.read_row_range(shard.url, inp.storage_options, shard.start, shard.stop, _input_columns(spec))


def _input_columns(spec: JobSpec) -> list[str]:
    inp = spec.input
    columns = ([inp.id_column] if inp.id_column else []) + list(inp.source_columns()) + list(inp.pass_through)
    return list(dict.fromkeys(columns))  # unique, in order


def context_length(model) -> int | None:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_model(spec: JobSpec):
    """Load tokenizer and model the way a real checkpoint is loaded; the only place torch is set up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    m, res = spec.model, spec.resources
    torch.set_num_threads(res.torch_threads or max(1, int(res.num_cpus)))
    device = "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(
        m.tokenizer or m.path, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    kwargs = dict(
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        use_safetensors=m.use_safetensors or None,  # None: prefer safetensors, fall back to pickle
        dtype=m.dtype,
    )
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(m.path, **kwargs).to(device).eval()
    return model, tokenizer
