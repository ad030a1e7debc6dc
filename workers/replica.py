"""A model replica: loads its engine once, then turns shard tasks into staged output files.

A plain class; the driver wraps it with `ray.remote` where it launches it.
Rows travel storage -> replica -> storage; only counts go back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pyarrow as pa

from jobs.core import faults, openai_batch
from jobs.core.cache import Entry
from jobs.core.dedupe import index_name
from jobs.core.metrics import job_name
from jobs.core.prompts import GENERATION_ERROR, RowError, decode_rows, max_new_tokens
from jobs.core.protocol import ShardResult, ShardTask, TaskKind, row_seed
from jobs.core.row_prompt import build_prompt
from jobs.core.rows import METADATA_KEY, id_name, is_batch, job_input_columns, read_shard_rows, row_ids
from jobs.core.spec import JobSpec
from jobs.core.times import now
from workers import shard_io
from workers.engine import Request, SamplingParams
from workers.engine_factory import create_engine
from workers.engine_loop import EngineLoop
from workers.quality import Candidate, Evaluator, Filters
from workers.row_cache import ReplicaCache


class Replica:
    def __init__(self, spec: JobSpec, job_facts: dict):
        faults.inject("replica.start")
        self.spec = spec
        self.loop = EngineLoop(lambda: create_engine(spec), job_name(spec.name, spec.output.uri), spec.resources.batch_size)
        self.engine = self.loop.engine
        self.described = self.engine.describe()
        engine = {k: v for k, v in self.described.items() if k in ("engine", "engine_version")}
        facts = json.dumps({**job_facts, **engine}, sort_keys=True)
        self.file_metadata = {METADATA_KEY.encode(): facts.encode()}  # Parquet schema metadata of every file
        self.cache = ReplicaCache(spec, job_facts.get("model", {}), self.described) if spec.cache else None
        self.evaluator = Evaluator(spec.evaluation) if spec.evaluation is not None else None
        self.filters = Filters(spec.filters, _job_index(spec)) if spec.filters is not None else None
        self.loaded_at = now()

    def info(self) -> dict:
        """Facts about this replica for the job record (and for tests: its pid)."""
        return {"pid": os.getpid(), **self.described}

    def publish_cache(self, attempt: str) -> int:
        """The driver committed this attempt: write its generated sequences to the row cache."""
        return self.cache.publish(attempt) if self.cache else 0

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
        table = task.rows if task.rows is not None else read_shard_rows(self.spec, task.shard)
        ids = row_ids(self.spec.input, task.shard, table)
        (rows, undecodable), n = decode_rows(table), self.spec.generation.num_return_sequences
        if is_batch(self.spec.input):  # every request asks for its own number of samples
            samples = [range(openai_batch.samples(row, n)) for row in rows]
        else:
            samples = [range(n)] * len(ids)
        out, err = self._generate(rows, ids, samples, undecodable)
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
        input_schema = pa.schema([errors.schema.field(c) for c in job_input_columns(self.spec)])
        out, err = self._generate(rows, ids, samples)
        return self._stage(task, out, err, input_schema, started, previous=data)

    def _generate(
        self, rows: list[dict], ids: list, samples: list, undecodable: dict[int, RowError] | None = None
    ) -> tuple[shard_io.OutputRows, shard_io.OutputRows]:
        """Output and dead-letter rows for the given sample indices of each row; `undecodable`:
        rows already known to fail (decode_rows)."""
        gen, context = self.spec.generation, self.engine.context_length
        prompts: dict[int, tuple[str, list[int]]] = {}
        failures: dict[int, RowError] = dict(undecodable or {})
        for i, row in enumerate(rows):
            if i in failures:
                continue
            try:
                prompts[i] = build_prompt(self.spec.input, row, self.engine.tokenizer, context)
            except RowError as e:
                failures[i] = e

        # request key = row * stride + sample_index; a batch request may ask for more samples than the spec
        stride = max((max(indices, default=0) + 1 for indices in samples), default=1)
        job_params = SamplingParams.from_spec(gen)
        requests = [
            request
            for i, (_, token_ids) in prompts.items()
            for request in self._requests(i * stride, rows[i], ids[i], samples[i], token_ids, job_params)
        ]
        keys = self.cache.keys(requests, stride) if self.cache else {}
        cached = self.cache.lookup(keys, {r.key: r.max_new_tokens for r in requests}) if self.cache else {}
        completions = {c.key: c for c in self.loop.generate([r for r in requests if r.key not in cached])}

        out, err = shard_io.OutputRows(), shard_io.OutputRows()
        out.dropped = shard_io.OutputRows()
        candidates: list[Candidate] = []  # generated (or cached) sequences, for the filters
        finished: list[Entry] = []
        for i, row in enumerate(rows):
            for s in samples[i]:
                if i in failures:
                    err.add(id=ids[i], sample_index=s, error_code=failures[i].code, error=str(failures[i]), row=row)
                    continue
                key = i * stride + s
                done = cached.get(key)
                if done is None:
                    c = completions[key]
                    if c.error is not None:
                        err.add(id=ids[i], sample_index=s, error_code=GENERATION_ERROR, error=c.error, row=row)
                        continue
                    done = Entry(c.text, c.finish_reason, len(c.token_ids))
                    if key in keys:
                        out.fresh[keys[key]] = done
                candidates.append(Candidate(i, s, done.text, prompts[i][0], done.completion_tokens))
                finished.append(done)
        if self.filters is not None:
            self.filters.apply(candidates, [(ids[c.row_index], c.sample_index) for c in candidates])
        for c, done in zip(candidates, finished):
            i = c.row_index
            scores = self.evaluator.scores(done.text, rows[i]) if self.evaluator is not None else {}
            kept = c.dropped_by is None
            out.cached += kept and (i * stride + c.sample_index) in cached  # of the rows in data/
            (out if kept else out.dropped).add(
                id=ids[i],
                sample_index=c.sample_index,
                text=done.text,
                finish_reason=done.finish_reason,
                prompt_tokens=len(prompts[i][1]),
                completion_tokens=done.completion_tokens,
                prompt=prompts[i][0],
                row=rows[i],
                **scores,
                **({} if kept else {"filter": c.dropped_by}),
            )
        return out, err

    def _requests(self, first_key: int, row: dict, row_id, samples, token_ids, job_params: SamplingParams) -> list[Request]:
        """A row's sequences (keys first_key + sample_index): the spec's settings, or those a batch request gives itself."""
        gen, context = self.spec.generation, self.engine.context_length
        seed, limit = gen.seed, max_new_tokens(self.spec, row, len(token_ids), context)
        params = None
        asked = openai_batch.request_of(row) if is_batch(self.spec.input) else None
        if asked is not None:
            seed = gen.seed if asked.seed is None else asked.seed  # replaces the job seed in row_seed
            if asked.max_tokens is not None:  # overrides the spec's limit; the context still bounds it
                limit = min(asked.max_tokens, context - len(token_ids)) if context else asked.max_tokens
            own = replace(job_params, **asked.sampling)
            params = own if own != job_params else None  # None: the engine's job-wide path
        return [
            Request(first_key + s, tuple(token_ids), row_seed(seed, row_id, s), limit, params) for s in samples
        ]

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
        dropped = out.dropped
        filtered = shard_io.filtered_table(self.spec, dropped, input_schema, self.file_metadata) if dropped.count else None
        staged = shard_io.stage(self.spec, task.shard.index, task.attempt, data, errors, filtered)
        if self.cache is not None and out.fresh:
            self.cache.hold(task.attempt, out.fresh)
        return ShardResult(
            shard=task.shard.index,
            attempt=task.attempt,
            samples_ok=data.num_rows,
            samples_failed=err.count,
            prompt_tokens=sum(data.column("prompt_tokens").to_pylist()),
            completion_tokens=sum(data.column("completion_tokens").to_pylist()),
            seconds=time.perf_counter() - started,
            data_url=staged.data_url,
            errors_url=staged.errors_url,
            samples_cached=out.cached,
            samples_filtered=dropped.count,
            filtered_url=staged.filtered_url,
            replica={"pid": os.getpid(), "loaded_at": self.loaded_at, **self.loop.stats(), **self._cache_stats()},
            inline_files=staged.inline,
        )

    def _cache_stats(self) -> dict:
        # In _job.json's run.replicas: cache entries this replica found unusable and regenerated.
        return {"cache_entries_rejected": self.cache.rejected} if self.cache is not None else {}


def _job_index(spec: JobSpec):
    """The run's index of sequences for filters.deduplicate across the job (jobs/core/dedupe.py),
    which the driver starts; None outside Ray (a bare Replica: duplicates within a row only)."""
    import ray

    if spec.filters.deduplicate == "none" or not ray.is_initialized():
        return None
    return _JobIndex(ray.get_actor(index_name(spec.fingerprint())))


class _JobIndex:
    def __init__(self, actor):
        self.actor = actor

    def check_and_add(self, items: list) -> list[bool]:
        import ray

        return ray.get(self.actor.check_and_add.remote(items))
