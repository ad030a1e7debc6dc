"""Runs a replica's engine in one background thread, fed by every shard in flight.

The replica takes several shards at a time (a threaded actor, one thread a
shard): while one is read or written, the others' sequences decode, and the
next shard's sequences join the running batch as the last one's finish, so
the model never idles at a shard boundary.

That thread also builds the engine, and makes every call on it. On CPU,
every thread that runs torch's parallel kernels gets its own OpenMP team, and
GNU OpenMP's threads stop spinning and sleep between kernels once a process
holds more of them than it has cores: a model loaded on one thread and stepped
on another ran 1.3x slower on 2 cores (vLLM, bench long-tail: 10.7 s against
8.0 s).

With a job name it records each step's time and batch occupancy as
Prometheus series (jobs/core/metrics.py), straight from the engine thread: a
record costs microseconds against a step's milliseconds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

from jobs.core import metrics
from jobs.core.times import now
from workers.engine import Completion, Engine, FatalDeviceError, Request

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, make_engine: Callable[[], Engine], job_name: str | None = None, batch_size: int | None = None):
        """Builds the engine on the loop's thread; raises what `make_engine` raised.
        `job_name` (the `job_name` label) and `batch_size` (resources.batch_size) turn
        on the step metrics; without them nothing is recorded."""
        self._cv = threading.Condition()
        self._arrived: list[_Ticket] = []  # handed over by the shards' threads, not yet submitted
        self._tickets: dict[int, _Ticket] = {}  # submitted, not yet done; the engine thread's alone
        self.times: dict[str, str] = {}  # first_step_at, idle_at: how busy this replica was
        self._metrics = _StepMetrics(job_name, batch_size) if job_name and batch_size else None
        self.engine: Engine
        built = threading.Event()
        failed: list[BaseException] = []
        threading.Thread(target=self._serve, args=(make_engine, built, failed), name="engine", daemon=True).start()
        built.wait()
        if failed:
            raise failed[0]

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions for `requests`, in order; blocks until all are done."""
        if not requests:
            return []
        ticket = _Ticket(len(requests))
        ticket.requests = [dataclasses.replace(r, key=(id(ticket), r.key)) for r in requests]
        with self._cv:
            self._arrived.append(ticket)
            self._cv.notify()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return [ticket.results[r.key] for r in requests]

    def stats(self) -> dict:
        return {**self.engine.stats(), **self.times}

    def sequences_left(self) -> int:
        """Sequences handed to the loop and not finished, from any thread: a snapshot."""
        # Both copies are taken under the GIL; the engine thread changes _tickets without the lock.
        with self._cv:
            tickets = [*self._arrived, *self._tickets.values()]
        return sum(ticket.expected - len(ticket.results) for ticket in tickets)

    def _serve(self, make_engine: Callable[[], Engine], built: threading.Event, failed: list) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:  # the constructor raises it
            failed.append(e)
            return
        finally:
            built.set()
        self._run()

    def _run(self) -> None:
        """Every engine call happens here. The lock guards only the hand-over: held
        through a step, it starved the shards' threads (a released lock went straight
        back to this loop), and shards joined the batch steps late."""
        while True:
            with self._cv:
                while not self._arrived and not self.engine.has_work():
                    self._cv.wait()
                arrived, self._arrived = self._arrived, []
            self._admit(arrived)
            if not self.engine.has_work():
                continue
            self.times.setdefault("first_step_at", now())
            held = self._held() if self._metrics is not None else 0  # for the occupancy metric only
            started = time.perf_counter()
            try:
                finished = self.engine.step()
            except FatalDeviceError:
                # This process's device is unusable: end it, so the driver
                # starts a fresh replica and requeues its shards.
                log.exception("fatal device error; exiting so the replica is replaced")
                os._exit(1)
            except BaseException as e:  # a bug: fail the shards in flight, keep serving
                log.exception("engine step failed")
                self.engine.abort_all()
                for ticket in list(self._tickets.values()):
                    self._fail(ticket, e)
                continue
            if self._metrics is not None:
                self._metrics.step(time.perf_counter() - started, held)
            for c in finished:
                ticket_id, key = c.key
                ticket = self._tickets.get(ticket_id)
                if ticket is None:  # its shard failed already (a submit that raised part-way)
                    continue
                ticket.results[key] = dataclasses.replace(c, key=key)
                if len(ticket.results) == ticket.expected:
                    del self._tickets[ticket_id]
                    ticket.done.set()
            if not self.engine.has_work():
                self.times["idle_at"] = now()

    def _held(self) -> int:
        """Sequences submitted and not finished: the engine's running and waiting ones."""
        return sum(ticket.expected - len(ticket.results) for ticket in self._tickets.values())

    def _admit(self, tickets: list[_Ticket]) -> None:
        for ticket in tickets:
            self._tickets[id(ticket)] = ticket
            try:
                self.engine.submit(ticket.requests)
            except Exception as e:  # this shard's requests only (an injected fault, say)
                self._fail(ticket, e)

    def _fail(self, ticket: _Ticket, error: BaseException) -> None:
        del self._tickets[id(ticket)]
        ticket.error = error
        ticket.done.set()


class _StepMetrics:
    """The replica's series: each engine step's wall time and batch occupancy."""

    def __init__(self, job_name: str, batch_size: int):
        from ray.util import metrics as ray_metrics

        self.recorder = metrics.Recorder(ray_metrics)  # never raises: a failed record is logged once
        self.job_name, self.batch_size = job_name, max(1, batch_size)

    def step(self, seconds: float, held: int) -> None:
        """`held`: sequences in the engine as the step began; more than a batch wait for a slot."""
        self.recorder.observe(metrics.ENGINE_STEP_SECONDS, seconds, job_name=self.job_name)
        occupancy = min(held, self.batch_size) / self.batch_size
        self.recorder.observe(metrics.ENGINE_BATCH_OCCUPANCY, occupancy, job_name=self.job_name)


@dataclasses.dataclass
class _Ticket:
    expected: int
    requests: list[Request] = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=dict)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None
