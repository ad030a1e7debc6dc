"""A model replica: loads the model once, then turns shards into staged output files.

A plain class; the driver wraps it with `ray.remote` where it launches it.
Rows travel storage -> replica -> storage; only small stats go back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
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
        self.loop = EngineLoop(self.engine)

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
        table = rows if rows is not None else read_shard_rows(self.spec, shard)
        id_column = self.spec.input.id_column
        ids = (
            table.column(id_column).to_pylist()
            if id_column
            else [f"{shard.relpath}:{i}" for i in range(shard.start, shard.stop)]
        )
        n = self.spec.generation.num_return_sequences
        out, err = self._generate(table.to_pylist(), ids, [range(n)] * len(ids))
        return self._stage(shard, attempt, out, err, table.schema, started)

    def retry_failed(self, shard: Shard, attempt: str) -> ShardResult:
        """Generate a committed shard's dead letters again and stage the shard
        anew: its data file plus what now succeeds, and what still fails."""
        started = time.perf_counter()
        opts, base = self.spec.output.storage_options, self.spec.output.uri.rstrip("/")
        data = storage.read_parquet(f"{base}/data/{shard.name}.parquet", opts)
        errors = storage.read_parquet(f"{base}/errors/{shard.name}.parquet", opts)
        id_name = self.spec.input.id_column or "id"
        # One input row per failed id, with the sample indices that failed.
        rows, ids, samples, where = [], [], [], {}
        for record in errors.to_pylist():
            key = record[id_name]
            if key not in where:
                where[key] = len(rows)
                rows.append(record)
                ids.append(key)
                samples.append([])
            samples[where[key]].append(record["sample_index"])
        input_schema = pa.schema([errors.schema.field(c) for c in _input_columns(self.spec)])
        out, err = self._generate(rows, ids, samples)
        return self._stage(shard, attempt, out, err, input_schema, started, previous=data)

    def _generate(self, rows: list[dict], ids: list, samples: list) -> tuple[_OutputRows, _OutputRows]:
        """Output and dead-letter rows for the given sample indices of each row."""
        from workers.engine import Request

        inp, gen = self.spec.input, self.spec.generation
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

        stride = gen.num_return_sequences  # request key = row * stride + sample_index
        requests = [
            Request(
                key=i * stride + s,
                prompt_ids=tuple(token_ids),
                seed=row_seed(gen.seed, ids[i], s),
                max_new_tokens=self._max_new_tokens(rows[i], len(token_ids)),
            )
            for i, (_, token_ids) in prompts.items()
            for s in samples[i]
        ]
        completions = {c.key: c for c in self.loop.generate(requests)}

        out, err = _OutputRows(), _OutputRows()
        for i, row in enumerate(rows):
            for s in samples[i]:
                if i in failures:
                    err.add(id=ids[i], sample_index=s, error_code=failures[i].code, error=str(failures[i]), row=row)
                    continue
                c = completions[i * stride + s]
                if c.error is not None:
                    err.add(id=ids[i], sample_index=s, error_code=GENERATION_ERROR, error=c.error, row=row)
                    continue
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
        return out, err

    def _max_new_tokens(self, row: dict, prompt_tokens: int) -> int:
        """The job's limit, lowered by the row's own and by the room left in the context."""
        limit = self.spec.generation.max_new_tokens
        column = self.spec.input.max_new_tokens_column
        if column and row[column] is not None:
            limit = max(1, min(limit, row[column]))
        return min(limit, self.context - prompt_tokens) if self.context else limit

    def _stage(
        self,
        shard: Shard,
        attempt: str,
        out: _OutputRows,
        err: _OutputRows,
        input_schema: pa.Schema,
        started: float,
        previous: pa.Table | None = None,
    ) -> ShardResult:
        """Write the attempt's files under _staging/ (or hand them back, for memory://)."""
        data = self._data_table(out, input_schema)
        if previous is not None:
            data = pa.concat_tables([previous.cast(data.schema), data])
        where = staging_dir(self.spec.output.uri, shard, attempt)
        staged = {f"{where}/data.parquet": storage.parquet_bytes(data)}
        if err.count:
            staged[f"{where}/errors.parquet"] = storage.parquet_bytes(self._errors_table(err, input_schema))
        inline = storage.process_local(self.spec.output.uri, self.spec.output.storage_options)
        if not inline:
            for url, payload in staged.items():
                storage.write_bytes(url, payload, self.spec.output.storage_options)
        return ShardResult(
            shard=shard.index,
            attempt=attempt,
            samples_ok=data.num_rows,
            samples_failed=err.count,
            prompt_tokens=sum(data.column("prompt_tokens").to_pylist()),
            completion_tokens=sum(data.column("completion_tokens").to_pylist()),
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


class EngineLoop:
    """Runs the engine in one background thread, fed by every shard in flight.

    The replica takes two shards at a time (a threaded actor): while one is
    read or written, the other's sequences decode, and the next shard's
    sequences join the running batch as the last one's finish, so the model
    never idles at a shard boundary."""

    def __init__(self, engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._tickets: dict[int, _Ticket] = {}
        self._thread: threading.Thread | None = None

    def generate(self, requests: list) -> list:
        """Completions for `requests`, in order; blocks until all are done."""
        if not requests:
            return []
        ticket = _Ticket(len(requests))
        with self._cv:
            self._tickets[id(ticket)] = ticket
            self.engine.submit([dataclasses.replace(r, key=(id(ticket), r.key)) for r in requests])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return [ticket.results[r.key] for r in requests]

    def _run(self) -> None:
        from workers.engine import FatalDeviceError

        while True:
            with self._cv:
                while not self.engine.has_work():
                    self._cv.wait()
                try:
                    finished = self.engine.step()
                except FatalDeviceError:
                    # This process's device is unusable: end it, so the driver
                    # starts a fresh replica and requeues its shards.
                    log.exception("fatal device error; exiting so the replica is replaced")
                    os._exit(1)
                except BaseException as e:  # a bug: fail the shards in flight, keep serving
                    log.exception("engine step failed")
                    self.engine.waiting.clear()
                    self.engine.running = None
                    for ticket in self._tickets.values():
                        ticket.error = e
                        ticket.done.set()
                    self._tickets.clear()
                    continue
                for c in finished:
                    ticket_id, key = c.key
                    ticket = self._tickets[ticket_id]
                    ticket.results[key] = dataclasses.replace(c, key=key)
                    if len(ticket.results) == ticket.expected:
                        ticket.done.set()
                        del self._tickets[ticket_id]


@dataclasses.dataclass
class _Ticket:
    expected: int
    results: dict = dataclasses.field(default_factory=dict)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


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
    columns = [inp.id_column] if inp.id_column else []
    columns += [*inp.source_columns(), *inp.pass_through]
    columns += [inp.max_new_tokens_column] if inp.max_new_tokens_column else []
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
