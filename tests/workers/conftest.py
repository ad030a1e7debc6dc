"""Fixtures of the replica-side tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def keep_torch_threads():
    """A Replica sets torch's thread count for its process; the test process gets its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def configured_replica(spec, job_facts: dict | None = None):
    """A Replica as the driver leaves it before dispatch: loaded, then configured."""
    from workers.replica import Replica

    replica = Replica(spec)
    replica.configure(job_facts or {})
    return replica
