"""OpenAI batch files on the replica (input.format openai-batch, jobs/core/openai_batch.py):
their reader and their render stage, chosen once for such an input.

A row is a request line. It asks for its own number of samples (its n, else
the spec's; a line that does not parse has one, its dead letter), renders as a
chat or a completion by its url, and its own max_tokens, seed and sampling
settings replace the spec's.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core import openai_batch
from jobs.core.plan import Shard
from jobs.core.rows import read_batch_rows
from workers.engine import Request
from workers.stages.read import Reader
from workers.stages.render import Render
from workers.stages.work import Prompt, ShardWork


class BatchReader(Reader):
    name = "read_batch"

    def read(self, shard: Shard) -> pa.Table:
        return read_batch_rows(shard.url, self.spec.input.storage_options, shard.relpath, shard.start, shard.stop)

    def samples(self, rows: list[dict]) -> list:
        n = self.spec.generation.num_return_sequences
        return [range(openai_batch.samples(row, n)) for row in rows]


class RenderBatch(Render):
    name = "render_batch"

    def prompt(self, row: dict) -> tuple[str, list[int]]:
        return openai_batch.build_prompt(row, self.tokenizer, self.context)

    def requests(self, work: ShardWork, i: int, prompt: Prompt) -> list[Request]:
        gen, context, row = self.spec.generation, self.context, work.rows[i]
        asked = openai_batch.request_of(row)  # parses: its prompt did
        seed = gen.seed if asked.seed is None else asked.seed  # replaces the job seed in row_seed
        limit = self.limit(row, prompt)
        if asked.max_tokens is not None:  # overrides the spec's limit; the context still bounds it
            limit = min(asked.max_tokens, context - len(prompt.token_ids)) if context else asked.max_tokens
        own = replace(self.job_params, **asked.sampling)
        params = own if own != self.job_params else None  # None: the engine's job-wide path
        return self.sample_requests(work, i, prompt, seed, limit, params)
