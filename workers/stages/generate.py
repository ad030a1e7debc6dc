"""Generate the requests on the replica's engine, through its EngineLoop (which batches
them with those of the other shards the replica holds). A sequence the engine could not
generate is a dead letter (generation_error); the rest of the shard goes on."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core.prompts import GENERATION_ERROR, RowError
from jobs.core.rows import GENERATED
from workers.engine_loop import EngineLoop
from workers.stages.stage import Columns, Stage
from workers.stages.work import Generated, ShardWork

# What a sequence brings to its row; prompt_tokens is the render stage's.
COLUMNS = tuple(f for f in GENERATED if f.name != "prompt_tokens")


class Generate(Stage):
    name = "generate"

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=COLUMNS)

    def run(self, work: ShardWork) -> ShardWork:
        generated, errors = dict(work.generated), dict(work.sequence_errors)
        to_generate = [r for r in work.requests if r.key not in work.generated]  # the row cache's hits are in
        for c in self.loop.generate(to_generate):
            if c.error is not None:
                errors[c.key] = RowError(GENERATION_ERROR, c.error)
            else:
                generated[c.key] = Generated(
                    c.text,
                    c.finish_reason,
                    len(c.token_ids),
                    token_ids=c.token_ids,
                    token_logprobs=c.token_logprobs,
                    top_logprobs=c.top_logprobs,
                )
        return replace(work, generated=generated, sequence_errors=errors)

    def stats(self) -> dict:
        return self.loop.stats()
