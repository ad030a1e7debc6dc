"""The first stage: a shard attempt's input rows, their ids and the samples to generate for each.

One reader per task: the input format's for a shard's rows (ParquetReader, or
workers/stages/batch.py's BatchReader for OpenAI batch files), and for
retry-failed the DeadLetterReader, whose rows are a committed shard's dead
letters. Process-local input (memory://) comes with the task, read by the
driver, since the replica's process cannot reach it.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core.plan import Shard
from jobs.core.prompts import decode_rows
from jobs.core.rows import carried_columns, id_field, id_name, job_input_columns, read_parquet_rows, row_ids
from jobs.core.spec import JobSpec
from workers import shard_io
from workers.stages.stage import Columns, Stage
from workers.stages.work import ShardWork


class Reader(Stage):
    """Reads the task's rows; a format's reader says how to read them and how many samples each asks for."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def columns(self, input_schema: pa.Schema) -> Columns:
        # data/ carries the id and the pass-through columns; errors/ every input column the job
        # reads, so a dead letter can be generated again from its own row.
        first = id_field(self.spec.input, input_schema)
        carried = [input_schema.field(c) for c in carried_columns(self.spec.input)]
        read = [input_schema.field(c) for c in job_input_columns(self.spec) if c != first.name]
        return Columns(data=(first, *carried), errors=(first, *read))

    def run(self, work: ShardWork) -> ShardWork:
        task = work.task
        table = task.rows if task.rows is not None else self.read(task.shard)
        ids = row_ids(self.spec.input, task.shard, table)
        rows, undecodable = decode_rows(table)  # a row with a string that is not UTF-8 is a dead letter
        return replace(
            work, input_schema=table.schema, rows=rows, ids=ids, samples=self.samples(rows), row_errors=undecodable
        )

    def read(self, shard: Shard) -> pa.Table:
        raise NotImplementedError

    def samples(self, rows: list[dict]) -> list:
        """Each row's sample indices."""
        raise NotImplementedError


class ParquetReader(Reader):
    name = "read_parquet"

    def read(self, shard: Shard) -> pa.Table:
        return read_parquet_rows(self.spec, shard)

    def samples(self, rows: list[dict]) -> list:
        return [range(self.spec.generation.num_return_sequences)] * len(rows)


class DeadLetterReader(Reader):
    """retry-failed: a committed shard's dead letters are the rows, its data rows are kept."""

    name = "read_dead_letters"

    def run(self, work: ShardWork) -> ShardWork:
        data, errors = shard_io.read_committed(self.spec, work.task.shard.index)
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
        return replace(work, input_schema=input_schema, rows=rows, ids=ids, samples=samples, committed_data=data)
