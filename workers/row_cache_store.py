"""The row cache's store (jobs/core/cache.py is its contract): reading entries
in batches and writing them, each one whole object, from a pool of writers.
Only replicas read and write it (workers/row_cache.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import fsspec

from jobs.core.cache import Entry, entry_path
from jobs.core.storage import with_retries, write_bytes

WRITERS = 16  # concurrent entry writes: object stores take many small PUTs in parallel well


class RowCache:
    """The entries under one cache.uri: batched reads, and whole-object writes in parallel."""

    def __init__(self, uri: str, storage_options: dict):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options)

    def url(self, key: str) -> str:
        return f"{self.uri}/{entry_path(key)}"

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{entry_path(key)}"

    def read_many(self, keys) -> dict[str, bytes]:
        """The stored bytes of the entries found among `keys`, in one batched read (s3fs
        fetches them concurrently)."""
        paths = {self._path(k): k for k in set(keys)}
        if not paths:
            return {}
        found = with_retries(lambda: self.fs.cat(list(paths), on_error="omit"), f"reading the cache at {self.uri}")
        return {paths[self.fs._strip_protocol(path)]: data for path, data in found.items()}

    def get_many(self, keys) -> dict[str, Entry]:
        """The entries found among `keys`; one that does not parse (Entry.from_bytes) is a miss."""
        entries = {}
        for key, data in self.read_many(keys).items():
            try:
                entries[key] = Entry.from_bytes(data)
            except ValueError:
                continue
        return entries

    def put_many(self, entries: dict[str, Entry]) -> None:
        """Write entries, each one whole object (a reader never sees half of one)."""
        with ThreadPoolExecutor(WRITERS) as pool:
            for _ in pool.map(lambda kv: write_bytes(self.url(kv[0]), kv[1].to_bytes(), self.storage_options),
                              entries.items()):  # fmt: skip
                pass
