"""Duplicates across a job (filters.deduplicate): a sequence's fingerprint, and the name
of the index the replicas share.

Exact duplicates compare a hash of the whitespace-normalised text; near duplicates
compare MinHash signatures of word 3-gram shingles (datasketch), found through
MinHash LSH at `filters.near_duplicate_threshold` (estimated Jaccard similarity).

The driver starts one index per run as a named Ray actor (`index_name`;
jobs/dedupe_index.py); each replica finds it by that name and asks it which of
a shard's sequences repeat one it has seen (workers/quality.py fingerprints
them with `Print`).
"""

from __future__ import annotations

import hashlib
import re

NUM_PERM = 64
SHINGLE = 3  # words


def index_name(fingerprint: str) -> str:
    return f"bulkgen-dedupe-{fingerprint}"


class Print:
    """A sequence's fingerprint: a hash (exact) or a MinHash (near)."""

    def __init__(self, text: str, near: bool):
        words = re.findall(r"\w+", text.lower())
        self.exact = hashlib.sha256(" ".join(words).encode()).hexdigest()
        self.minhash = None
        if near:
            from datasketch import MinHash

            self.minhash = MinHash(num_perm=NUM_PERM, seed=1)
            shingles = {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
            for s in shingles:
                self.minhash.update(s.encode())

    def similar(self, other: Print, threshold: float) -> bool:
        if self.exact == other.exact:
            return True
        return self.minhash is not None and self.minhash.jaccard(other.minhash) >= threshold
