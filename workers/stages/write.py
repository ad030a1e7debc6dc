"""The last stage: assemble the output rows in input order and stage the attempt's files.

Every (id, sample_index) of the attempt lands in exactly one file: data/ when it
was generated (or cached) and kept, filtered/ when a filter dropped it, errors/
when it is a dead letter. Retry-failed puts the shard's committed data rows
first, so the staged data file replaces the committed one whole. Its tally
counts what the files hold.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa

from jobs.core.layout import DATA, ERRORS, FILTERED
from jobs.core.protocol import Tally
from jobs.core.rows import ERROR_FIELDS, METADATA_KEY, REASONING_TOKENS
from jobs.core.spec import JobSpec
from workers import shard_io
from workers.stages.stage import Columns, Stage
from workers.stages.work import ShardWork


def file_metadata(job_facts: dict, engine: dict) -> dict[bytes, bytes]:
    """The Parquet schema metadata of every file: the job's facts and the engine that ran
    (`engine`: the replica's engine.describe())."""
    ran = {k: v for k, v in engine.items() if k in ("engine", "engine_version")}
    return {METADATA_KEY.encode(): json.dumps({**job_facts, **ran}, sort_keys=True).encode()}


class Write(Stage):
    name = "write"

    def __init__(self, spec: JobSpec, metadata: dict[bytes, bytes]):
        self.spec, self.metadata = spec, metadata
        # Token counts summed over data/'s rows: those every job has, and the thinking's when it is kept apart.
        reasoning = (REASONING_TOKENS.name,) if spec.generation.reasoning != "off" else ()
        self.summed = ("prompt_tokens", "completion_tokens", *reasoning)
        self.counters = ("rows_done", "rows_failed", "rows_cached", *self.summed)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(errors=ERROR_FIELDS)

    def run(self, work: ShardWork) -> ShardWork:
        out, err, dropped = shard_io.OutputRows(), shard_io.OutputRows(), shard_io.OutputRows()
        cached = 0  # of the rows in data/
        for i, s, key in work.each_sample():
            row, row_id = work.rows[i], work.ids[i]
            error = work.row_errors.get(i) or work.sequence_errors.get(key)
            if error is not None:
                err.add(id=row_id, sample_index=s, error_code=error.code, error=str(error), row=row)
                continue
            g, prompt = work.generated[key], work.prompts[i]
            values = dict(
                sample_index=s,
                text=g.text,
                finish_reason=g.finish_reason,
                prompt_tokens=len(prompt.token_ids),
                completion_tokens=g.completion_tokens,
                prompt=prompt.text,
                **g.columns,
                **work.row_columns.get(i, {}),
            )
            if g.dropped_by is None:
                out.add(id=row_id, row=row, **values)
                cached += g.cached
            else:
                dropped.add(id=row_id, row=row, **values, filter=g.dropped_by)

        spec, schema, metadata = self.spec, work.input_schema, self.metadata
        data = shard_io.data_table(spec, out, schema, metadata)
        if work.committed_data is not None:
            data = pa.concat_tables([work.committed_data.cast(data.schema), data])
        tables = {DATA: data}
        if err.count:
            tables[ERRORS] = shard_io.errors_table(spec, err, schema, metadata)
        if dropped.count:
            tables[FILTERED] = shard_io.filtered_table(spec, dropped, schema, metadata)
        staged = shard_io.stage(spec, work.task.shard.index, work.task.attempt, tables)
        tally = Tally(
            rows_done=data.num_rows,
            rows_failed=err.count,
            rows_cached=cached,
            **{name: sum(data.column(name).to_pylist()) for name in self.summed},
        )
        return replace(work, tally=work.tally + tally, staged=staged.urls, inline_files=staged.inline)
