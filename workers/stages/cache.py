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

    def __init__(self, cache: ReplicaCache):
        self.cache = cache

    def run(self, work: ShardWork) -> ShardWork:
        keys = self.cache.keys(work.requests, work.stride)
        found = self.cache.lookup(keys, {r.key: r.max_new_tokens for r in work.requests})
        hits = {key: Generated(e.text, e.finish_reason, e.completion_tokens, cached=True) for key, e in found.items()}
        misses = [r for r in work.requests if r.key not in found]
        return replace(work, requests=misses, generated={**work.generated, **hits})

    def stats(self) -> dict:
        # Cache entries this replica found unusable and regenerated.
        return {"cache_entries_rejected": self.cache.rejected}


class CacheKeep(Stage):
    name = "cache_keep"

    def __init__(self, cache: ReplicaCache):
        self.cache = cache

    def run(self, work: ShardWork) -> ShardWork:
        # work.requests are the ones generated: the lookup removed the hits.
        keys = self.cache.keys(work.requests, work.stride)
        fresh = {keys[key]: Entry(g.text, g.finish_reason, g.completion_tokens)
                 for key, g in work.generated.items() if key in keys}  # fmt: skip
        if fresh:
            self.cache.hold(work.task.attempt, fresh)
        return work

    def publish(self, attempt: str) -> int:
        return self.cache.publish(attempt)
