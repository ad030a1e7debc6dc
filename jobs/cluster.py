"""Connecting the driver to Ray: join a cluster, or start a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a local Ray on loopback.

    Returns whether this call started Ray, so the caller knows to shut it down."""
    import ray

    import jobs
    import workers

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ship our own two packages with the job, so a cluster whose image has
        # torch and transformers but not bulkgen can still run it.
        ray.init(
            address=address,
            runtime_env={"py_modules": [jobs, workers]},
            logging_level=logging.WARNING,
        )
        log.info("joined Ray cluster at %s", address)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
        log.info("started a local Ray instance")
    return True
