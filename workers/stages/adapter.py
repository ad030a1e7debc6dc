"""Choose each row's adapter (model.adapter, model.adapters): set it on the row's requests, which
the engine then runs through that LoRA (several adapters in one batch), and in the row's
`adapter` column.

The adapter is model.adapter's ("default") for every row; else the row's input.adapter_column
(null: the base model) or, for an OpenAI batch line, its body.model when that names one of
model.adapters (vLLM's convention: a request picks its LoRA by its model; any other model is
the base model's name). A name that is no adapter of the job is the row's dead letter
(unknown_adapter); the driver refuses such an input before a run (jobs/validate.py), so only a
stage run outside it meets one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pyarrow as pa

from jobs.core import adapters, openai_batch
from jobs.core.prompts import UNKNOWN_ADAPTER, RowError
from jobs.core.rows import ADAPTER, is_batch
from jobs.core.spec import JobSpec
from workers.stages.stage import Columns, Stage
from workers.stages.work import ShardWork


class ChooseAdapter(Stage):
    name = "adapter"

    def __init__(self, spec: JobSpec):
        self.names = frozenset(spec.model.adapter_set())
        self.adapter_of = _chooser(spec, self.names)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=(ADAPTER,))

    def run(self, work: ShardWork) -> ShardWork:
        chosen: dict[int, str | None] = {}
        errors = dict(work.row_errors)
        for i in work.prompts:  # the rows that rendered
            name = self.adapter_of(work.rows[i])
            if name is None or name in self.names:
                chosen[i] = name
            else:
                known = sorted(self.names)
                errors[i] = RowError(UNKNOWN_ADAPTER, f"adapter {name!r} is not one of model.adapters {known}")
        requests = []
        for r in work.requests:
            row = r.key // work.stride  # key = row * stride + sample index
            if row in chosen:  # the rest are dead letters
                requests.append(replace(r, adapter=chosen[row]))
        columns = {**work.row_columns, **{i: {**work.row_columns.get(i, {}), ADAPTER.name: n} for i, n in chosen.items()}}
        return replace(work, requests=requests, row_errors=errors, row_columns=columns)


def _chooser(spec: JobSpec, names: frozenset[str]) -> Callable[[dict], str | None]:
    """The function that reads a row's adapter name (None: the base model), chosen once."""
    if spec.model.adapter is not None:
        return lambda row: adapters.DEFAULT
    if is_batch(spec.input):
        return lambda row: _batch_model(row, names)
    column = spec.input.adapter_column
    return lambda row: row[column]


def _batch_model(row: dict, names: frozenset[str]) -> str | None:
    model = openai_batch.request_of(row).model  # it parses: its prompt rendered
    return model if model in names else None
