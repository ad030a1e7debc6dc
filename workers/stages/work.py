"""What flows through a replica's stages: one ShardWork per shard attempt.

Each stage takes the attempt's ShardWork and returns a new one with what it
adds (dataclasses.replace), never changing the one it was given. Rows are
addressed by their index in the shard, sequences by their request key,
`row * stride + sample_index`, which is also the engine's and the row cache's
handle for them. A row or a sequence that cannot be generated is a typed dead
letter (RowError), kept beside the rest until the write stage files it in
errors/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa

from jobs.core.prompts import RowError
from jobs.core.protocol import ShardTask, Tally
from workers.engine import Request, TopLogprobs


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Generated:
    """One sequence, generated or taken from the row cache, on its way to data/ or filtered/."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    cached: bool = False  # the row cache gave it
    columns: dict = field(default_factory=dict)  # values of the output columns later stages add (scores), by name
    dropped_by: str | None = None  # the filter that sends it to filtered/
    token_ids: tuple[int, ...] = ()  # generated tokens, end-of-sequence excluded (a stage's `needs`)
    # The text as generated, where a stage after generation replaced `text` (the reasoning split:
    # the answer); the row cache keeps this one, since jobs that split nothing share its entries.
    generated_text: str | None = None
    token_logprobs: tuple[float, ...] | None = None  # per token, when its request asked
    top_logprobs: tuple[TopLogprobs, ...] | None = None


@dataclass(frozen=True)
class ShardWork:
    task: ShardTask
    # The read: the input rows (as dicts), their ids, the sample indices to generate for
    # each, and the input columns' types (for the files' schemas).
    input_schema: pa.Schema | None = None
    rows: list[dict] = field(default_factory=list)
    ids: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # per row: its sample indices (a range, or retry-failed's list)
    committed_data: pa.Table | None = None  # retry-failed: the shard's committed data rows, which stay
    # Render: each row's prompt, and a request for every sequence to generate; the stages
    # before generate add to them (an adapter, a grammar, logprobs), the row cache adds
    # its hits to `generated`, and generate runs the requests not in `generated`.
    prompts: dict[int, Prompt] = field(default_factory=dict)  # by row index
    requests: list[Request] = field(default_factory=list)
    generated: dict[int, Generated] = field(default_factory=dict)  # by request key
    row_columns: dict[int, dict] = field(default_factory=dict)  # by row index: output values set before
    # generation (the row's adapter), which the write stage adds to each of the row's samples
    # Dead letters: a row's error stands for all its samples (read, render, adapter, ask_structured); a
    # sequence's for itself (generate, check_structured).
    row_errors: dict[int, RowError] = field(default_factory=dict)  # by row index
    sequence_errors: dict[int, RowError] = field(default_factory=dict)  # by request key
    tally: Tally = field(default_factory=Tally)
    # Write: file kind -> staged URL, and for process-local output the files' bytes by URL.
    staged: dict[str, str] = field(default_factory=dict)
    inline_files: dict[str, bytes] | None = None

    @cached_property
    def stride(self) -> int:
        # A batch request may ask for more samples than the spec's num_return_sequences.
        return max((max(indices, default=0) + 1 for indices in self.samples), default=1)

    def key(self, row: int, sample_index: int) -> int:
        """A sequence's request key."""
        return row * self.stride + sample_index

    @cached_property
    def _requests_by_key(self) -> dict[int, Request]:
        return {r.key: r for r in self.requests}

    def asked(self, key: int) -> Request:
        """The request of the sequence `key`."""
        return self._requests_by_key[key]

    def each_sample(self) -> Iterator[tuple[int, int, int]]:
        """(row index, sample index, request key) of every sequence of the shard, in output order."""
        for i, indices in enumerate(self.samples):
            for s in indices:
                yield i, s, self.key(i, s)

    def each_generated(self) -> Iterator[tuple[int, int, int, Generated]]:
        """(row index, sample index, request key, sequence) of every sequence generated or cached, in output order."""
        for i, s, key in self.each_sample():
            if key in self.generated:
                yield i, s, key, self.generated[key]
