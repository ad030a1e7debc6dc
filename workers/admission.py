"""The transformers engine's waiting requests: one admission order across every shard it holds.

Longest prompts first, so that one prefill pads little and a batch too large
for memory shows it early; and rows that share a prompt prefix
(jobs/core/prefix.py `prefix_key` over their token ids) next to each other,
so one prefill can compute the prefix once (TransformersEngine, prefix
sharing): a group takes the place of the first of its rows to arrive, and its
rows follow one another there, longest first. Whatever shard a row
came from, the order is the same; only aging looks at shards: a shard whose
rows have waited `AGE_STEPS` admissions goes first, so a stream of new shards
cannot starve an old one. Order never touches a request's seed.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from jobs.core.prefix import prefix_key
from workers.engine import Request

AGE_STEPS = 16  # admissions (prefill chunks) a shard's rows may wait before they go first


class WaitingQueue:
    """Requests waiting for a slot in the running batch.

    `push` takes one shard's requests (one submit); `head`/`pop` serve them in
    admission order; `begin_admission` is called once per admission (one
    prefill chunk) and advances the clock that aging reads; `push_front` puts
    requests back first (a failed batch's rows, retried smaller)."""

    def __init__(self, age_steps: int = AGE_STEPS):
        self.age_steps = age_steps
        self._front: deque[Request] = deque()
        self._heap: list[tuple] = []  # (order, seq, shard, request, prefix key): unique seq, so order then seq decide
        self._shards: dict[int, tuple[int, deque]] = {}  # shard -> (arrived at admission, its heap entries, sorted)
        self._groups: dict[int, list[int]] = {}  # prefix key -> [its place (a prompt length), rows waiting]
        self._popped: set[int] = set()  # seq of entries served out of heap order (aging)
        self._seq = itertools.count()
        self._shard_ids = itertools.count()
        self._admissions = 0
        self._aged: int | None = None  # the shard served first during this admission
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request (no particular order)."""
        yield from self._front
        for _, seq, _, request, _ in self._heap:
            if seq not in self._popped:
                yield request

    def push(self, requests: Iterable[Request]) -> None:
        """Queue one shard's requests."""
        shard = next(self._shard_ids)
        entries = []
        for r in requests:
            key = prefix_key(r.prompt_ids)
            place = len(r.prompt_ids)
            if key is not None:
                group = self._groups.setdefault(key, [place, 0])
                group[1] += 1
                place = group[0]
            entry = ((-place, key or 0, -len(r.prompt_ids)), next(self._seq), shard, r, key)
            heapq.heappush(self._heap, entry)
            entries.append(entry)
        if entries:
            self._shards[shard] = (self._admissions, deque(sorted(entries)))
            self._size += len(entries)

    def push_front(self, requests: Iterable[Request]) -> None:
        """Put `requests` first, in their order."""
        requests = list(requests)
        self._front.extendleft(reversed(requests))
        self._size += len(requests)

    def begin_admission(self) -> None:
        """One more admission: pick the shard that has waited too long, if one has."""
        self._admissions += 1
        oldest = min(self._shards.items(), key=lambda s: s[1][0], default=None)
        self._aged = None
        if oldest is not None and self._admissions - oldest[1][0] > self.age_steps:
            self._aged = oldest[0]

    def head(self) -> Request:
        """The next request to admit (IndexError when none waits)."""
        if self._front:
            return self._front[0]
        return self._next_entry()[3]

    def pop(self) -> Request:
        """Remove and return `head()`."""
        if self._front:
            self._size -= 1
            return self._front.popleft()
        entry = self._next_entry()
        _, seq, shard, request, key = entry
        if self._heap and self._heap[0] is entry:
            heapq.heappop(self._heap)
        else:
            self._popped.add(seq)  # served by aging: skipped when it surfaces in the heap
        if key is not None:
            group = self._groups[key]
            group[1] -= 1
            if not group[1]:
                del self._groups[key]
        arrived, entries = self._shards[shard]
        # Always its shard's first entry: aging serves a shard's first, and the heap's top is
        # the least entry of all, so the least of its shard's.
        served = entries.popleft()
        assert served is entry, "WaitingQueue served an entry that is not its shard's first"
        if not entries:
            del self._shards[shard]
            if self._aged == shard:
                self._aged = None
        self._size -= 1
        return request

    def clear(self) -> None:
        self.__init__(self.age_steps)

    def _next_entry(self) -> tuple:
        if self._aged is not None:
            return self._shards[self._aged][1][0]
        while self._heap and self._heap[0][1] in self._popped:
            self._popped.discard(heapq.heappop(self._heap)[1])
        if not self._heap:
            raise IndexError("no request is waiting")
        return self._heap[0]
