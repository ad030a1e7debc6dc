"""Quality filters (filters:): a sequence a filter drops goes to filtered/ with the filter's
name instead of data/, never silently away (the rules: workers/quality.py's Filters)."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from jobs.core.dedupe import index_name
from jobs.core.protocol import Tally
from jobs.core.rows import FILTER, LOGPROB_SUM
from jobs.core.spec import JobSpec
from workers.quality import Candidate, Filters
from workers.stages.stage import Columns, Stage
from workers.stages.work import Generated, ShardWork


class Filter(Stage):
    name = "filter"
    counters = ("rows_filtered",)

    def __init__(self, spec: JobSpec):
        self.filters = Filters(spec.filters, _job_index(spec))

    def columns(self, input_schema: pa.Schema) -> Columns:
        return Columns(filtered=(FILTER,))

    def run(self, work: ShardWork) -> ShardWork:
        # In output order: the first of a row's (or the job's) duplicates is the one kept.
        keys, candidates = [], []
        for i, s, key, g in work.each_generated():
            keys.append(key)
            candidates.append(Candidate(i, s, g.text, work.prompts[i].text, g.completion_tokens, _mean_logprob(g)))
        self.filters.apply(candidates, [(work.ids[c.row_index], c.sample_index) for c in candidates])
        dropped = {key: c.dropped_by for key, c in zip(keys, candidates) if c.dropped_by is not None}
        marked = {key: replace(work.generated[key], dropped_by=name) for key, name in dropped.items()}
        tally = work.tally + Tally(rows_filtered=len(dropped))
        return replace(work, generated={**work.generated, **marked}, tally=tally)


def _mean_logprob(g: Generated) -> float | None:
    """The sequence's mean token logprob, from the logprobs stage's column (it runs before this one);
    None where its request asked for no logprobs (a batch line) or it has no tokens."""
    total = g.columns.get(LOGPROB_SUM.name)
    return total / g.completion_tokens if total is not None and g.completion_tokens else None


def _job_index(spec: JobSpec):
    """The run's index of sequences for filters.deduplicate across the job (jobs/dedupe_index.py),
    which the driver starts before its replica actors; None outside a Ray actor (a bare Replica
    in a script or a test, even where that process has joined Ray: duplicates within a row only)."""
    import ray

    if spec.filters.deduplicate == "none" or not ray.is_initialized():
        return None
    if ray.get_runtime_context().get_actor_id() is None:  # not the replica actor the driver started
        return None
    return _JobIndex(ray.get_actor(index_name(spec.fingerprint())))


class _JobIndex:
    def __init__(self, actor):
        self.actor = actor

    def check_and_add(self, items: list) -> list[bool]:
        import ray

        return ray.get(self.actor.check_and_add.remote(items))
