"""Render and tokenize each row's prompt, and make its requests: one per sample, with the
sample's seed (a function of the job seed, row id and sample index only) and the row's
limit on new tokens (the job's, lowered by the row's own and by the room left in the context).

A row whose prompt cannot be built (empty, a template that fails, too long for
the context) is a dead letter. workers/stages/batch.py renders an OpenAI batch
file's requests, which bring their own settings.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core.prompts import RowError, build_prompt, max_new_tokens
from jobs.core.protocol import row_seed
from jobs.core.rows import GENERATED, PROMPT
from jobs.core.spec import JobSpec
from workers.engine import Request, SamplingParams
from workers.stages.stage import Columns, Stage
from workers.stages.work import Prompt, ShardWork

PROMPT_TOKENS = next(f for f in GENERATED if f.name == "prompt_tokens")


class Render(Stage):
    name = "render"

    def __init__(self, spec: JobSpec, tokenizer, context: int | None):
        """`context`: the model's context length (None: unknown, no limit)."""
        self.spec, self.tokenizer, self.context = spec, tokenizer, context
        self.job_params = SamplingParams.from_spec(spec.generation)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=(PROMPT_TOKENS, *((PROMPT,) if self.spec.output.include_prompt else ())))

    def run(self, work: ShardWork) -> ShardWork:
        prompts: dict[int, Prompt] = {}
        errors = dict(work.row_errors)
        for i, row in enumerate(work.rows):
            if i in errors:
                continue
            try:
                prompts[i] = Prompt(*self.prompt(row))
            except RowError as e:
                errors[i] = e
        requests = [r for i, prompt in prompts.items() for r in self.requests(work, i, prompt)]
        return replace(work, prompts=prompts, requests=requests, row_errors=errors)

    def prompt(self, row: dict) -> tuple[str, list[int]]:
        """(prompt text, token ids) of a row, or RowError."""
        return build_prompt(self.spec.input, row, self.tokenizer, self.context)

    def requests(self, work: ShardWork, i: int, prompt: Prompt) -> list[Request]:
        """Row i's requests, one per sample index."""
        limit = self.limit(work.rows[i], prompt)
        return self.sample_requests(work, i, prompt, self.spec.generation.seed, limit, None)

    def limit(self, row: dict, prompt: Prompt) -> int:
        """The row's max_new_tokens: the job's, lowered by the row's own and by the room left in the context."""
        return max_new_tokens(self.spec, row, len(prompt.token_ids), self.context)

    @staticmethod
    def sample_requests(work: ShardWork, i: int, prompt: Prompt, seed: int, limit: int, params) -> list[Request]:
        """Row i's requests with these settings (`params` None: the engine's job-wide sampling)."""
        ids = tuple(prompt.token_ids)
        return [Request(work.key(i, s), ids, row_seed(seed, work.ids[i], s), limit, params) for s in work.samples[i]]
