"""Connecting the driver to Ray: join a cluster, or start a local one; in the
background (connect_async), while the driver validates the job."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import threading

from jobs.core import faults
from jobs.core.errors import ClusterError
from jobs.core.times import now

log = logging.getLogger(__name__)

SUBMITTED_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted driver
# Ray's warnings that are untrue or idle for a bulkgen driver, kept out of its output (logger, start):
# ray.init on RayStart's thread says it set no SIGTERM handler, which the driver has anyway
# (result() puts it back); a local Ray the run starts and stops announces its token auth,
# which the user never chose nor needs (a joined cluster's notice stays).
NO_SIGTERM_HANDLER = ("ray._private.worker", "SIGTERM handler is not set")
TOKEN_AUTH_ON = ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled")
NICENESS_ENV = "RAY_worker_niceness"  # Ray's own setting for its workers' nice value (default 15)
CLOSE_WAIT_S = 60.0  # how long a run that ends waits for a ray.init under way, to shut down what it started


class RayStart:
    """Ray being started or joined on a thread beside the driver's validation (connect_async).

    Ctrl-C and SIGTERM reach the main thread wherever it is (validating, or waiting in
    result()), and whoever ends the run calls close(). ray.init off the main thread sets
    no Python SIGTERM handler, but Ray's core worker puts its own C-level one in place of
    the driver's: result(), on the main thread, puts the driver's handlers back, as
    connect does where it runs on the main thread. The thread lives
    until close() and shuts down the Ray it started itself: Ray's own processes die
    with the thread that forked them (PR_SET_PDEATHSIG, which Linux ties to the
    thread, not the process), so that thread must outlive the run's use of Ray."""

    def __init__(self, address: str | None):
        self.started = False  # whether this run started Ray (and so shuts it down)
        self.ready_at: str | None = None  # when Ray was up
        self.stopped_at: str | None = None  # when the Ray this run started was shut down
        self._error: BaseException | None = None
        self._handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the driver's
        self._up = threading.Event()  # connected, or failed to
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(address,), name="ray-start", daemon=True)
        self._thread.start()

    def _hold(self, address: str | None) -> None:
        try:
            self.started = connect(address)
            self.ready_at = now()
        except BaseException as e:  # result() raises it in the driver, after validation (bad input first)
            self._error = e
        finally:
            self._up.set()
        self._closing.wait()
        if self.started:
            import ray

            ray.shutdown()
            self.stopped_at = now()

    def result(self) -> bool:
        """Wait until Ray is up; whether this run started it. Raises what connecting raised (ClusterError)."""
        while not self._up.wait(0.1):  # a short wait at a time: Ctrl-C reaches the main thread meanwhile
            pass
        if threading.current_thread() is threading.main_thread():
            for s, handler in self._handlers.items():
                signal.signal(s, handler)
        if self._error is not None:
            raise self._error
        return self.started

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """The run is over: shut down the Ray it started, once a ray.init still under way
        returns (up to `wait_s`; past that the process exits without it, and Ray's own
        processes end with it). A joined cluster is left running."""
        self._closing.set()
        self._thread.join(wait_s)


def connect_async(address: str | None) -> RayStart:
    """connect(address) on a thread: Ray starts while the driver validates."""
    return RayStart(address)


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a local Ray on loopback.

    Returns whether this call started Ray, so the caller knows to shut it down."""
    import ray

    if ray.is_initialized():
        return False
    with _signals_held() as held:
        faults.inject("driver.connect")
        try:
            _init(ray, address or os.environ.get("RAY_ADDRESS"))
        except SystemExit:  # ray.init's own SIGTERM handler (sys.exit), in place until it returns
            held.append(signal.SIGTERM)
    if held:  # Ctrl-C or SIGTERM came during ray.init: stop the Ray just started or joined, and leave
        ray.shutdown()
        raise KeyboardInterrupt(f"signal {held[0]} during ray.init")
    return True


def _init(ray, address: str | None) -> None:
    if address:
        # Ship our own two packages with the job, so a cluster whose image has
        # torch and transformers but not bulkgen can still run it. A driver that
        # `bulkgen submit` started already has them: in its job's working_dir,
        # which Ray gives every replica too.
        submitted = SUBMITTED_DRIVER_ENV in os.environ
        runtime_env = {} if submitted else {"py_modules": [package_dir("jobs"), package_dir("workers")]}
        try:
            with _quiet(NO_SIGTERM_HANDLER):
                ray.init(address=address, runtime_env=runtime_env or None, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ClusterError(
                f"cannot join the Ray cluster at {address}: {e}\n  a cluster with token auth needs "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) in the driver's environment; "
                "see cluster/README.md"
            ) from e
        log.info("joined Ray cluster at %s", address)
    else:
        with _quiet(NO_SIGTERM_HANDLER, TOKEN_AUTH_ON):
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING,
                     _system_config=_own_ray_config())
        log.info("started a local Ray instance")


class _DropStartingWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextlib.contextmanager
def _quiet(*notices: tuple[str, str]):
    """Drop these (logger, message start) records while the block runs."""
    filters = [(logging.getLogger(name), _DropStartingWith(start)) for name, start in notices]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def _own_ray_config() -> dict:
    """Settings for a Ray this run starts (never a joined cluster's). Its workers, the replicas
    among them, run at nice 0 instead of Ray's 15: the run owns the processes, and at nice 15 a
    replica loading its model got a sliver of a core beside the driver and any busy process, so
    the first token waited on them. RAY_worker_niceness, where set, is the user's choice."""
    return {} if NICENESS_ENV in os.environ else {"worker_niceness": 0}


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM while ray.init runs; yields the signals that came.

    Interrupted half-way, ray.init leaves a half-started Ray that a driver not yet
    connected cannot shut down: it finishes, then connect shuts it down and leaves.
    ray.init also sets its own SIGTERM handler (sys.exit) as it starts, which would
    make `ray job stop` or Kubernetes end the driver as failed instead of cancelled:
    the handlers in place before are put back, whatever ray.init set (a SIGTERM
    that comes before that is ray.init's SystemExit, which connect holds too)."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield came
        return

    def hold(signum, frame):
        came.append(signum)
        if len(came) > 1:  # asked twice (ray.init stuck on an unreachable cluster?): out now
            raise KeyboardInterrupt(f"signal {signum} during ray.init, twice")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, hold)
    try:
        yield came
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def package_dir(name: str) -> str:
    """Where a top-level package of ours lives, found without importing it (the
    driver runs none of the replica side's code; it only ships it)."""
    return importlib.util.find_spec(name).submodule_search_locations[0]
