"""Which shard runs next, on which replica, and what a failure costs: the
driver's scheduling policy, as a plain object without Ray (jobs/dispatch.py
feeds it events).

- Balance: every ready replica gets one shard before any gets a second. Each
  then takes shards until their sequences fill one engine batch (a half-empty
  batch costs every step, to the end of the job), leaving one for each replica
  still loading. More than that (a second batch's worth, so the batch refills
  as rows finish and I/O overlaps generation) only while the queue still
  holds a shard for every replica of the job, ready or still loading, so the
  last shards go to whichever replica frees up first instead of queueing
  behind a busy one.
- Replica deaths: which of a dead replica's shards killed it is unknown, so
  each becomes a suspect and is charged nothing; a suspect runs alone on an
  idle replica, and only a death while it runs alone is charged to it.
- Failures: a failed attempt is charged to its shard, which goes to the back
  of the queue (healthy shards first); the max_attempts-th charge ends the job.
- Generating or writing: a shard whose rows have left the engine (`generated`)
  no longer counts against the replica's depth, so the replica gets its next
  shard while it parses and writes that one; `hold` caps all the shards a
  replica holds, writing ones included (its threads and memory).
- Prefix groups (Shard.group): a replica takes the next shard of a group it
  holds or held last; failing that, one of a group no other replica with room
  holds; failing that, the first in the queue, so it never idles.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass

from jobs.core.plan import Shard
from jobs.core.protocol import TaskKind

IN_FLIGHT_PER_REPLICA = 2  # the next shard waits at the replica, so it never idles between shards
# Shards past the engine (parsed, filtered, written) a replica may hold beside its generating
# ones: two, so that one slow write (an object store's) does not keep the next shard that
# leaves the engine from making room. ReplicaPool gives each replica a thread for every one.
WRITING_PER_REPLICA = 2


def shards_per_batch(batch_size: int, rows_per_shard: int, samples_per_row: int) -> int:
    """Shards whose sequences fill one engine batch (at least one)."""
    return max(1, -(-batch_size // (rows_per_shard * samples_per_row)))


def shards_per_replica(batch_size: int, rows_per_shard: int, samples_per_row: int) -> int:
    """Shards a replica may hold while they generate (the scheduler's depth): sequences for
    two of its engine's batches, so that the batch refills from waiting sequences as rows
    finish instead of draining until a whole shard ends (at least IN_FLIGHT_PER_REPLICA)."""
    sequences = rows_per_shard * samples_per_row
    return max(IN_FLIGHT_PER_REPLICA, -(-2 * batch_size // sequences))


@dataclass(frozen=True)
class Work:
    shard: Shard
    kind: TaskKind = TaskKind.PROCESS


@dataclass
class Slot:
    """A shard a replica holds: generating (its rows need the engine) or past that (parsed, written, committed)."""

    work: Work
    generating: bool = True


class ShardExhausted(Exception):
    """A shard was charged max_attempts failures."""

    def __init__(self, work: Work, attempts: int, error: str):
        super().__init__(f"shard {work.shard.name} failed {attempts} times; last error: {error}")
        self.work, self.attempts, self.error = work, attempts, error


class ShardQueue:
    """The shards waiting to run, in order, kept by prefix group (Shard.group; None for the
    ungrouped): the next shard of a group, or the first one in order, is found by looking at
    each group's head, not by walking the whole queue (12,500 shards at 200,000 rows)."""

    def __init__(self, work: Iterable[Work] = ()):
        self._groups: dict[int | None, deque[tuple[int, Work]]] = {}  # group -> (position, work), in order
        self._front = self._back = 0  # the positions the next appendleft and append take
        self._len = 0
        for w in work:
            self.append(w)

    def append(self, work: Work) -> None:
        self._back += 1
        self._entries(work).append((self._back, work))

    def appendleft(self, work: Work) -> None:
        self._front -= 1
        self._entries(work).appendleft((self._front, work))

    def _entries(self, work: Work) -> deque[tuple[int, Work]]:
        self._len += 1
        return self._groups.setdefault(work.shard.group, deque())

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Work]:
        return (work for _, work in heapq.merge(*self._groups.values(), key=lambda entry: entry[0]))

    def grouped(self) -> bool:
        """Whether a queued shard belongs to a prefix group."""
        return any(group is not None for group in self._groups)

    def take(
        self, eligible: Callable[[Work], bool], prefer: Collection[int] = (), avoid: Collection[int] = ()
    ) -> Work | None:
        """Remove and return the first eligible shard, in queue order, of a `prefer` group; else of
        a group not in `avoid` (ungrouped shards are in none); else the first eligible one."""
        firsts: dict[int | None, tuple[int, int]] = {}  # group -> (position, index in its deque) of its first eligible
        for group, entries in self._groups.items():
            found = next(((pos, i) for i, (pos, work) in enumerate(entries) if eligible(work)), None)
            if found is not None:
                firsts[group] = found
        for choice in (
            [g for g in firsts if g is not None and g in prefer],
            [g for g in firsts if g is None or g not in avoid],
            list(firsts),
        ):
            if choice:
                group = min(choice, key=lambda g: firsts[g][0])
                entries = self._groups[group]
                _, work = entries[firsts[group][1]]
                del entries[firsts[group][1]]
                if not entries:
                    del self._groups[group]
                self._len -= 1
                return work
        return None


class ShardScheduler:
    def __init__(
        self,
        work: Iterable[Work],
        max_attempts: int,
        depth: int = IN_FLIGHT_PER_REPLICA,
        replicas: int = 1,
        fill: int = 1,
        hold: int | None = None,
    ):
        self.queue = ShardQueue(work)
        self.max_attempts = max_attempts
        self.depth = depth  # shards a replica may hold that still generate
        self.fill = min(fill, depth)  # shards that fill its engine's batch
        # Every shard a replica may hold, generating or written: one thread each on the replica
        # (the default is what ReplicaPool gives it).
        self.hold = max(depth, hold if hold is not None else depth + WRITING_PER_REPLICA)
        # The job's replica count: one still loading its model (or replacing a
        # dead one) will want its share too, so the first ready one must not take it.
        self.replicas = replicas
        self.in_flight: dict[Hashable, list[Slot]] = {}  # ready replica -> the shards it holds, in order
        self.last_group: dict[Hashable, int] = {}  # replica -> the prefix group of the last grouped shard it took
        self.suspects: set[int] = set()  # shard indices in flight on a replica that died
        self.charged: Counter[int] = Counter()  # failures charged to each shard
        self.dispatches: Counter[int] = Counter()  # tries of each shard, for attempt names
        self.retried = 0  # attempts that had to be redone, charged or not

    # -- replicas ------------------------------------------------------------------

    def add_replica(self, replica: Hashable) -> None:
        self.in_flight.setdefault(replica, [])

    def replica_died(self, replica: Hashable, error: str) -> list[Work]:
        """Requeue a dead replica's shards, generating or not (none is committed); returns
        them. Raises ShardExhausted."""
        lost = [slot.work for slot in self.in_flight.pop(replica, [])]
        self.last_group.pop(replica, None)
        ran_alone = len(lost) == 1 and lost[0].shard.index in self.suspects
        for work in lost:
            if ran_alone:
                self._charge(work, f"replica died: {error}")  # it stays a suspect: alone again
            else:
                self.suspects.add(work.shard.index)
                self.retried += 1
                self.queue.appendleft(work)
        return lost

    # -- dispatch ------------------------------------------------------------------

    def assign(self) -> list[tuple[Hashable, Work, int]]:
        """(replica, work, try number) for every shard that should start now."""
        started = []
        for depth in range(1, self.depth + 1):
            for replica in list(self.in_flight):
                if depth > 1 and len(self.queue) <= self._held_back(depth):
                    return started
                while self._has_room(replica, depth) and (work := self._take_for(replica)):
                    self.in_flight[replica].append(Slot(work))
                    self.dispatches[work.shard.index] += 1
                    started.append((replica, work, self.dispatches[work.shard.index]))
        return started

    def _held_back(self, depth: int) -> int:
        """Shards to leave queued rather than hand out as a replica's depth-th."""
        loading = max(0, self.replicas - len(self.in_flight))
        if depth <= self.fill:
            return loading  # fill the batch; one each for replicas still loading
        replicas = max(self.replicas, len(self.in_flight))
        return replicas if replicas > 1 else 0  # one for every replica; a lone one has no one to leave them for

    def _has_room(self, replica: Hashable, depth: int) -> bool:
        """Fewer than `depth` of its shards generate, and it holds fewer than `hold` in all."""
        slots = self.in_flight[replica]
        return sum(s.generating for s in slots) < depth and len(slots) < self.hold

    def _take_for(self, replica: Hashable) -> Work | None:
        """The next queued shard this replica may take: none beside a suspect, a suspect only when
        idle; of its own prefix group first, then of a group no other replica with room holds."""
        slots = self.in_flight[replica]
        if any(s.work.shard.index in self.suspects for s in slots):
            return None
        idle = not slots

        def eligible(work: Work) -> bool:
            return idle or work.shard.index not in self.suspects

        if not self.queue.grouped():
            return self.queue.take(eligible)
        mine = self._groups_of(replica)
        others = {
            g for r in self.in_flight if r != replica and self._has_room(r, self.depth) for g in self._groups_of(r)
        }
        work = self.queue.take(eligible, prefer=mine, avoid=others)
        if work is not None and work.shard.group is not None:
            self.last_group[replica] = work.shard.group
        return work

    def _groups_of(self, replica: Hashable) -> set[int]:
        """The prefix groups of the shards a replica holds, and of the last grouped one it took."""
        groups = {s.work.shard.group for s in self.in_flight[replica]} | {self.last_group.get(replica)}
        groups.discard(None)
        return groups

    # -- outcomes ------------------------------------------------------------------

    def generated(self, replica: Hashable, work: Work) -> None:
        """The shard's rows have left the replica's engine: it no longer counts against depth."""
        self._slot(replica, work).generating = False

    def succeeded(self, replica: Hashable, work: Work) -> None:
        self.in_flight[replica].remove(self._slot(replica, work))
        self.suspects.discard(work.shard.index)

    def failed(self, replica: Hashable, work: Work, error: str) -> None:
        """The attempt raised (the replica lives on): charge it. Raises ShardExhausted."""
        self.in_flight[replica].remove(self._slot(replica, work))
        self._charge(work, error)

    def _slot(self, replica: Hashable, work: Work) -> Slot:
        return next(s for s in self.in_flight[replica] if s.work == work)

    def _charge(self, work: Work, error: str) -> None:
        self.charged[work.shard.index] += 1
        self.retried += 1
        if self.charged[work.shard.index] >= self.max_attempts:
            raise ShardExhausted(work, self.charged[work.shard.index], error)
        self.queue.append(work)  # last: the healthy shards first

    def done(self) -> bool:
        return not self.queue and not any(self.in_flight.values())
