"""generation.reasoning: each sequence's thinking apart from its answer.

Splits the generated token ids at the end tag (jobs/core/reasoning.py), the
same way whichever engine generated them or the row cache gave them: `text`
becomes the answer, the thinking goes to the `reasoning` column and its
tokens (up to and including the end tag) to `reasoning_tokens`. It runs
before the filters and the evaluation, so they judge the answer alone.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pyarrow as pa

from jobs.core import reasoning
from jobs.core.rows import REASONING, REASONING_TOKENS
from jobs.core.spec import JobSpec
from workers.engine import SamplingParams, completion_text
from workers.stages.stage import Columns, Stage
from workers.stages.work import ShardWork


class SplitReasoning(Stage):
    name = "reasoning"
    needs = frozenset({"token_ids"})  # a row-cache entry without them is a miss

    def __init__(self, spec: JobSpec, tokenizer):
        self.tokenizer = tokenizer
        self.tags = reasoning.job_tags(spec.generation.reasoning, spec.model, tokenizer)
        self.tag_ids = reasoning.TagIds.of(self.tags, tokenizer)
        self.params = SamplingParams.from_spec(spec.generation)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=(REASONING, REASONING_TOKENS))

    def run(self, work: ShardWork) -> ShardWork:
        generated = dict(work.generated)
        for i, _, key, g in work.each_generated():
            # The request's own stop strings (a batch line's) cut its text, as the engine cut it.
            stop = (work.asked(key).params or self.params).stop
            decode = partial(completion_text, self.tokenizer, stop=stop)
            part = reasoning.split(g.token_ids, self.tags, self.tag_ids, decode, work.prompts[i].text)
            columns = {**g.columns, REASONING.name: part.reasoning, REASONING_TOKENS.name: part.reasoning_tokens}
            generated[key] = replace(g, text=part.answer, columns=columns, generated_text=g.text)
        return replace(work, generated=generated)
