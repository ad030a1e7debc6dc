"""The job's index of kept sequences for filters.deduplicate across the job: a Ray actor
the driver starts once per run (named jobs.core.dedupe.index_name) and the replicas share.

It is seeded with the job's committed rows, read by the actor from data/ (never
through the driver); each replica asks it which of a shard's sequences repeat one
it has seen, and it adds the others. The first sequence shown of a group stays; a
shard retried after a crash shows the same (id, sample_index) again, which is
never its own duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable

from jobs.core.dedupe import NUM_PERM, Print, index_name
from jobs.core.protocol import CommitRecord
from jobs.core.rows import id_name
from jobs.core.spec import JobSpec
from jobs.core.storage import read_parquet


class DedupeIndex:
    """Every kept sequence of the job so far; a Ray actor (one per run, see index_name)."""

    def __init__(self, near: bool, threshold: float, committed: list[tuple[str, dict]] = (), id_column: str = "id"):
        """`committed`: (data file URL, storage options) of the shards committed before this run."""
        from datasketch import MinHashLSH

        self.near, self.threshold = near, threshold
        self.exact: dict[str, object] = {}  # text hash -> (id, sample_index) of its first sequence
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM) if near else None
        for url, options in committed:
            table = read_parquet(url, options, columns=[id_column, "sample_index", "text"])
            rows = zip(*(table.column(c).to_pylist() for c in (id_column, "sample_index", "text")))
            self.check_and_add([((i, s), Print(t, near)) for i, s, t in rows])

    def check_and_add(self, items: list[tuple[object, Print]]) -> list[bool]:
        """For each (key, print): whether it repeats a sequence with another key; adds those that do not."""
        repeats = []
        for key, p in items:
            key = tuple(key) if isinstance(key, list) else key
            first = self.exact.get(p.exact)
            duplicate = first is not None and first != key
            if not duplicate and first is None and self.lsh is not None:
                duplicate = any(other != repr(key) for other in self.lsh.query(p.minhash))
            repeats.append(duplicate)
            if not duplicate and first is None:
                self.exact[p.exact] = key
                if self.lsh is not None and repr(key) not in self.lsh.keys:  # a retry may bring new text
                    self.lsh.insert(repr(key), p.minhash)
        return repeats


def start_dedupe_index(spec: JobSpec, out, commits: Iterable[CommitRecord]):
    """filters.deduplicate across the job: start the run's index (a handle to keep while the run
    lasts: the actor lives as long as its driver), seeded with the shards committed before this
    run; None when the job does not deduplicate across itself. Needs a connected Ray."""
    import ray

    f = spec.filters
    if f is None or f.deduplicate == "none":
        return None
    committed = [(out.url(c.data), spec.output.storage_options) for c in commits]
    return ray.remote(DedupeIndex).options(name=index_name(spec.fingerprint()), num_cpus=0).remote(
        f.deduplicate == "near", f.near_duplicate_threshold, committed, id_name(spec.input)
    )
