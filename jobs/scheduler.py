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
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from jobs.core.plan import Shard
from jobs.core.protocol import TaskKind

IN_FLIGHT_PER_REPLICA = 2  # the next shard waits at the replica, so it never idles between shards


def shards_per_batch(batch_size: int, rows_per_shard: int, samples_per_row: int) -> int:
    """Shards whose sequences fill one engine batch (at least one)."""
    return max(1, -(-batch_size // (rows_per_shard * samples_per_row)))


def shards_per_replica(batch_size: int, rows_per_shard: int, samples_per_row: int) -> int:
    """Shards a replica may hold: sequences for two of its engine's batches, so that
    the batch refills from waiting sequences as rows finish instead of draining
    until a whole shard ends (at least IN_FLIGHT_PER_REPLICA)."""
    sequences = rows_per_shard * samples_per_row
    return max(IN_FLIGHT_PER_REPLICA, -(-2 * batch_size // sequences))


@dataclass(frozen=True)
class Work:
    shard: Shard
    kind: TaskKind = TaskKind.PROCESS


class ShardExhausted(Exception):
    """A shard was charged max_attempts failures."""

    def __init__(self, work: Work, attempts: int, error: str):
        super().__init__(f"shard {work.shard.name} failed {attempts} times; last error: {error}")
        self.work, self.attempts, self.error = work, attempts, error


class ShardScheduler:
    def __init__(
        self,
        work: Iterable[Work],
        max_attempts: int,
        depth: int = IN_FLIGHT_PER_REPLICA,
        replicas: int = 1,
        fill: int = 1,
    ):
        self.queue: deque[Work] = deque(work)
        self.max_attempts = max_attempts
        self.depth = depth  # shards a replica may hold
        self.fill = min(fill, depth)  # shards that fill its engine's batch
        # The job's replica count: one still loading its model (or replacing a
        # dead one) will want its share too, so the first ready one must not take it.
        self.replicas = replicas
        self.in_flight: dict[Hashable, list[Work]] = {}  # ready replica -> its shards, in order
        self.suspects: set[int] = set()  # shard indices in flight on a replica that died
        self.charged: Counter[int] = Counter()  # failures charged to each shard
        self.dispatches: Counter[int] = Counter()  # tries of each shard, for attempt names
        self.retried = 0  # attempts that had to be redone, charged or not

    # -- replicas ------------------------------------------------------------------

    def add_replica(self, replica: Hashable) -> None:
        self.in_flight.setdefault(replica, [])

    def replica_died(self, replica: Hashable, error: str) -> list[Work]:
        """Requeue a dead replica's shards; returns them. Raises ShardExhausted."""
        lost = self.in_flight.pop(replica, [])
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
                while len(self.in_flight[replica]) < depth and (work := self._take_for(replica)):
                    self.in_flight[replica].append(work)
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

    def _take_for(self, replica: Hashable) -> Work | None:
        """The next queued shard this replica may take: none beside a suspect, a suspect only when idle."""
        running = self.in_flight[replica]
        if any(w.shard.index in self.suspects for w in running):
            return None
        for i, work in enumerate(self.queue):
            if work.shard.index not in self.suspects or not running:
                del self.queue[i]
                return work
        return None

    # -- outcomes ------------------------------------------------------------------

    def succeeded(self, replica: Hashable, work: Work) -> None:
        self.in_flight[replica].remove(work)
        self.suspects.discard(work.shard.index)

    def failed(self, replica: Hashable, work: Work, error: str) -> None:
        """The attempt raised (the replica lives on): charge it. Raises ShardExhausted."""
        self.in_flight[replica].remove(work)
        self._charge(work, error)

    def _charge(self, work: Work, error: str) -> None:
        self.charged[work.shard.index] += 1
        self.retried += 1
        if self.charged[work.shard.index] >= self.max_attempts:
            raise ShardExhausted(work, self.charged[work.shard.index], error)
        self.queue.append(work)  # last: the healthy shards first

    def done(self) -> bool:
        return not self.queue and not any(self.in_flight.values())
