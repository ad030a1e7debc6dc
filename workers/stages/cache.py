"""The row cache (cache.uri) as two stages around generation: look the requests up before
generating them, and once the attempt's files are staged, keep what was generated until the
driver has committed the shard (it then calls Replica.publish_cache, which publishes here).

Rows taken from the cache are counted where they land in data/ (the write stage's
rows_cached), since a filter may still drop one.
"""

from __future__ import annotations

from dataclasses import replace

from jobs.core.cache import Entry
from workers.row_cache import ReplicaCache
from workers.stages.stage import Stage
from workers.stages.work import Generated, ShardWork


class CacheLookup(Stage):
    name = "cache_lookup"

    def __init__(self, cache: ReplicaCache, needs: frozenset[str] = frozenset()):
        self.cache = cache
        self.needs = needs  # what the stages after generation read of a sequence: an entry without it is a miss

    def run(self, work: ShardWork) -> ShardWork:
        keys = self.cache.keys(work.requests, work.stride)
        found = self.cache.lookup(keys, work.requests, self.needs)
        hits = {
            key: Generated(
                e.text,
                e.finish_reason,
                e.completion_tokens,
                cached=True,
                token_ids=e.token_ids or (),
                token_logprobs=e.token_logprobs,
                top_logprobs=e.top_logprobs,
            )
            for key, e in found.items()
        }
        return replace(work, generated={**work.generated, **hits})

    def stats(self) -> dict:
        # Cache entries this replica found unusable and regenerated.
        return {"cache_entries_rejected": self.cache.rejected}


class CacheKeep(Stage):
    name = "cache_keep"

    def __init__(self, cache: ReplicaCache):
        self.cache = cache

    def run(self, work: ShardWork) -> ShardWork:
        generated = [r for r in work.requests if r.key in work.generated and not work.generated[r.key].cached]
        keys = self.cache.keys(generated, work.stride)
        fresh = {keys[key]: _entry(work.generated[key]) for key in keys}
        if fresh:
            self.cache.hold(work.task.attempt, fresh)
        return work

    def publish(self, attempt: str) -> int:
        return self.cache.publish(attempt)


def _entry(g: Generated) -> Entry:
    return Entry(
        g.text if g.generated_text is None else g.generated_text,
        g.finish_reason,
        g.completion_tokens,
        token_ids=g.token_ids,
        token_logprobs=g.token_logprobs,
        top_logprobs=g.top_logprobs,
    )
