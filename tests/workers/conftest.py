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
