"""Evaluation against references (evaluation:): each sequence's scores against its row's
reference column (workers/quality.py's Evaluator), in columns of data/ (and filtered/)."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core.rows import EVALUATION_FIELDS, carried_columns
from jobs.core.spec import JobSpec
from workers.quality import Evaluator
from workers.stages.stage import Columns, Stage
from workers.stages.work import ShardWork


class Evaluate(Stage):
    name = "evaluate"

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.evaluator = Evaluator(spec.evaluation)

    def columns(self, input_schema: pa.Schema) -> Columns:
        reference = self.spec.evaluation.reference_column
        # The reference goes to data/ too: the report's corpus scores need it.
        carried = () if reference in carried_columns(self.spec.input) else (input_schema.field(reference),)
        return Columns(data=(*EVALUATION_FIELDS, *carried))

    def run(self, work: ShardWork) -> ShardWork:
        scored = {
            key: replace(g, columns={**g.columns, **self.evaluator.scores(g.text, work.rows[i])})
            for i, _, key, g in work.each_generated()
        }
        return replace(work, generated={**work.generated, **scored})
