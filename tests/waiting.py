"""Waiting in tests for something another process or thread does: one polling helper."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy, and return that; after `timeout` s
    fail naming `what` we waited for (a callable: asked then, so it can tell the last state seen).
    The condition is asked once more at the deadline, so a slow poll still gets its last look."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
