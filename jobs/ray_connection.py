"""Connecting the driver to Ray: join a cluster, or start a local one."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import threading

from jobs.core import faults
from jobs.core.errors import ClusterError

log = logging.getLogger(__name__)

SUBMITTED_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted driver


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
            ray.init(address=address, runtime_env=runtime_env or None, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ClusterError(
                f"cannot join the Ray cluster at {address}: {e}\n  a cluster with token auth needs "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) in the driver's environment; "
                "see cluster/README.md"
            ) from e
        log.info("joined Ray cluster at %s", address)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
        log.info("started a local Ray instance")


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
