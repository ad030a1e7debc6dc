"""A model replica: loads its engine once, then turns shard tasks into staged output files.

A plain class; the driver wraps it with `ray.remote` where it launches it.
Rows travel storage -> replica -> storage; only counts go back.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa

from jobs.core import faults
from jobs.core.metrics import job_name
from jobs.core.prompts import GENERATION_ERROR, RowError, build_prompt, max_new_tokens
from jobs.core.protocol import ShardResult, ShardTask, TaskKind, row_seed
from jobs.core.rows import METADATA_KEY, id_name, input_columns, read_shard_rows, row_ids
from jobs.core.spec import JobSpec
from jobs.core.times import now
from workers import shard_io
from workers.engine import Request, create_engine
from workers.engine_loop import EngineLoop


class Replica:
    def __init__(self, spec: JobSpec, job_facts: dict):
        self.spec = spec
        self.engine = create_engine(spec)
        engine = {k: v for k, v in self.engine.describe().items() if k in ("engine", "engine_version")}
        facts = json.dumps({**job_facts, **engine}, sort_keys=True)
        self.file_metadata = {METADATA_KEY.encode(): facts.encode()}  # Parquet schema metadata of every file
        self.loop = EngineLoop(self.engine, job_name(spec.name, spec.output.uri), spec.resources.batch_size)
        self.loaded_at = now()

    def info(self) -> dict:
        """Facts about this replica for the job record (and for tests: its pid)."""
        return {"pid": os.getpid(), **self.engine.describe()}

    def run(self, task: ShardTask) -> ShardResult:
        """Generate one shard attempt and stage its files under _staging/."""
        faults.inject("replica.shard_start", shard=task.shard.index, attempt=task.attempt)
        started = time.perf_counter()
        if task.kind is TaskKind.RETRY_FAILED:
            result = self._retry_failed(task, started)
        else:
            result = self._process(task, started)
        faults.inject("replica.shard_end", shard=task.shard.index, attempt=task.attempt)
        return result

    def _process(self, task: ShardTask, started: float) -> ShardResult:
        table = task.rows if task.rows is not None else read_shard_rows(self.spec.input, task.shard)
        ids = row_ids(self.spec.input, task.shard, table)
        n = self.spec.generation.num_return_sequences
        out, err = self._generate(table.to_pylist(), ids, [range(n)] * len(ids))
        return self._stage(task, out, err, table.schema, started)

    def _retry_failed(self, task: ShardTask, started: float) -> ShardResult:
        """Generate a committed shard's dead letters again and stage the shard
        anew: its data file plus what now succeeds, and what still fails."""
        data, errors = shard_io.read_committed(self.spec, task.shard.index)
        key_column = id_name(self.spec.input)
        # One input row per failed id, with the sample indices that failed.
        rows, ids, samples, where = [], [], [], {}
        for record in errors.to_pylist():
            key = record[key_column]
            if key not in where:
                where[key] = len(rows)
                rows.append(record)
                ids.append(key)
                samples.append([])
            samples[where[key]].append(record["sample_index"])
        input_schema = pa.schema([errors.schema.field(c) for c in input_columns(self.spec.input)])
        out, err = self._generate(rows, ids, samples)
        return self._stage(task, out, err, input_schema, started, previous=data)

    def _generate(self, rows: list[dict], ids: list, samples: list) -> tuple[shard_io.OutputRows, shard_io.OutputRows]:
        """Output and dead-letter rows for the given sample indices of each row."""
        gen, context = self.spec.generation, self.engine.context_length
        prompts: dict[int, tuple[str, list[int]]] = {}
        failures: dict[int, RowError] = {}
        for i, row in enumerate(rows):
            try:
                prompts[i] = build_prompt(self.spec.input, row, self.engine.tokenizer, context)
            except RowError as e:
                failures[i] = e

        stride = gen.num_return_sequences  # request key = row * stride + sample_index
        requests = [
            Request(
                key=i * stride + s,
                prompt_ids=tuple(token_ids),
                seed=row_seed(gen.seed, ids[i], s),
                max_new_tokens=max_new_tokens(self.spec, rows[i], len(token_ids), context),
            )
            for i, (_, token_ids) in prompts.items()
            for s in samples[i]
        ]
        completions = {c.key: c for c in self.loop.generate(requests)}

        out, err = shard_io.OutputRows(), shard_io.OutputRows()
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

    def _stage(
        self,
        task: ShardTask,
        out: shard_io.OutputRows,
        err: shard_io.OutputRows,
        input_schema: pa.Schema,
        started: float,
        previous: pa.Table | None = None,
    ) -> ShardResult:
        data = shard_io.data_table(self.spec, out, input_schema, self.file_metadata)
        if previous is not None:
            data = pa.concat_tables([previous.cast(data.schema), data])
        errors = shard_io.errors_table(self.spec, err, input_schema, self.file_metadata) if err.count else None
        data_url, errors_url, inline = shard_io.stage(self.spec, task.shard.index, task.attempt, data, errors)
        return ShardResult(
            shard=task.shard.index,
            attempt=task.attempt,
            samples_ok=data.num_rows,
            samples_failed=err.count,
            prompt_tokens=sum(data.column("prompt_tokens").to_pylist()),
            completion_tokens=sum(data.column("completion_tokens").to_pylist()),
            seconds=time.perf_counter() - started,
            data_url=data_url,
            errors_url=errors_url,
            replica={"pid": os.getpid(), "loaded_at": self.loaded_at, **self.loop.stats()},
            inline_files=inline,
        )
