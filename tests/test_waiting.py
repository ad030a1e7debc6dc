"""The one polling helper of the tests (tests/waiting.py)."""

from __future__ import annotations

import itertools

import pytest

from tests.waiting import wait_for


def test_returns_the_first_truthy_value():
    calls = itertools.count()
    assert wait_for(lambda: next(calls) >= 2 and "ready", 5, "the third call", interval=0) == "ready"


def test_fails_naming_what_it_waited_for():
    with pytest.raises(AssertionError, match=r"timed out after 0s waiting for the moon"):
        wait_for(lambda: None, 0, "the moon", interval=0)
    seen: list[int] = []
    with pytest.raises(AssertionError) as info:
        wait_for(lambda: seen.append(len(seen)), 0.01, lambda: f"a scrape that passes (last: {seen[-1]})", interval=0)
    # A callable `what` is asked at the deadline: it tells the last state seen.
    assert str(info.value).endswith(f"waiting for a scrape that passes (last: {len(seen) - 1})")
