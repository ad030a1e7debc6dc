"""Log-probabilities (generation.logprobs) as two stages around generation:

    ask_logprobs   every request asks the engine for its chosen tokens' logprobs and,
                   with top_logprobs K, for each step's K most likely tokens (Request.logprobs);
                   a batch line asks for its own (body.logprobs, top_logprobs); before the
                   row cache's lookup, so the ask is part of each sequence's key
    logprobs       the token_ids, token_logprobs, top_logprobs (K > 0) and logprob_sum columns
                   (jobs/core/rows.py's logprob_fields), from what the engine or the row cache gave

A logprob is the same on both engines: the model's log-softmax after any structured
constraint's mask, before repetition penalty, temperature, top-k and top-p (vLLM's
raw_logprobs); workers/engine.py's LOGPROB_TOLERANCE is how far the two may differ.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pyarrow as pa

from jobs.core import openai_batch
from jobs.core.rows import (
    LOGPROB_SUM,
    TOKEN_IDS,
    TOKEN_LOGPROBS,
    TOP_LOGPROBS,
    is_batch,
    logprob_fields,
    top_logprobs_possible,
)
from jobs.core.spec import JobSpec
from workers.stages.stage import Columns, Stage
from workers.stages.work import Generated, ShardWork


class AskLogprobs(Stage):
    name = "ask_logprobs"

    def __init__(self, spec: JobSpec):
        g = spec.generation
        self.k = g.top_logprobs if g.logprobs else None  # 0: the chosen tokens' logprobs only; None: none
        self.batch = is_batch(spec.input)  # a batch line asks for its own (body.logprobs, top_logprobs)

    def run(self, work: ShardWork) -> ShardWork:
        if not self.batch:
            return replace(work, requests=[replace(r, logprobs=self.k) for r in work.requests])
        stride = work.stride
        asked = {i: openai_batch.request_of(work.rows[i]).logprobs_for(self.k) for i in work.prompts}  # they parse
        return replace(work, requests=[replace(r, logprobs=asked[r.key // stride]) for r in work.requests])


class LogprobColumns(Stage):
    name = "logprobs"
    needs = frozenset({"token_ids"})  # a row-cache entry also holds what its request asked (its key says)

    def __init__(self, spec: JobSpec):
        self.top = top_logprobs_possible(spec)

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(data=logprob_fields(self.top))

    def run(self, work: ShardWork) -> ShardWork:
        filled = {
            key: replace(g, columns={**g.columns, **logprob_values(g, self.top)}) for key, g in work.generated.items()
        }
        return replace(work, generated=filled)


def logprob_values(g: Generated, top: bool) -> dict:
    """A sequence's logprob columns (with top_logprobs when `top`), all null where its request
    did not ask; top_logprobs is null too where it asked for no top K."""
    asked = g.token_logprobs is not None
    values = {
        TOKEN_IDS.name: list(g.token_ids) if asked else None,
        TOKEN_LOGPROBS.name: list(g.token_logprobs) if asked else None,
        LOGPROB_SUM.name: math.fsum(g.token_logprobs) if asked else None,  # exact: the mean is sum / tokens
    }
    if top:
        steps = g.top_logprobs
        values[TOP_LOGPROBS.name] = (
            None if steps is None else [[{"token_id": t, "logprob": p} for t, p in step] for step in steps]
        )
    return values
