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


def shard_result(replica, task):
    """A Replica.run in-process, as the driver sees it through Ray: the one ShardProgress
    (the rows left the engine), then the ShardResult, which is returned."""
    from jobs.core.protocol import ShardProgress, ShardResult

    progress, result = replica.run(task)
    assert isinstance(progress, ShardProgress) and (progress.shard, progress.attempt) == (task.shard.index, task.attempt)
    assert isinstance(result, ShardResult)
    return result
