"""A row's prompt, whichever input format it comes from: prompt columns of a
Parquet input (jobs/core/prompts.py) or a line of an OpenAI batch file
(jobs/core/openai_batch.py), which renders its chat or completion with the same
column code. Above both, so the generic prompt builder imports nothing of the
batch format; shared by the driver's scan (`bulkgen validate`) and the replicas.
"""

from __future__ import annotations

from typing import Any

from jobs.core import openai_batch, prompts
from jobs.core.rows import is_batch
from jobs.core.spec import InputSpec


def build_prompt(spec: InputSpec, row: dict[str, Any], tokenizer, context: int | None) -> tuple[str, list[int]]:
    """(prompt text, token ids) for `row`, or RowError; the prompt must leave room for one new token."""
    if is_batch(spec):  # chat or completion, decided by each line
        return openai_batch.build_prompt(row, tokenizer, context)
    return prompts.build_prompt(spec, row, tokenizer, context)
