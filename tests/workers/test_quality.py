"""Filters and the job's duplicate index, without Ray (workers/quality.py, jobs/dedupe_index.py)."""

from __future__ import annotations

from jobs.core.dedupe import Print
from jobs.core.spec import FiltersSpec
from jobs.dedupe_index import DedupeIndex
from workers.quality import Candidate, Filters

LONG = "the quick brown fox jumps over the lazy dog near the old river bank this morning"
NEAR = "the quick brown fox jumps over the lazy dog near the old river bank this evening"
OTHER = "a completely different sentence about lists of numbers and their sums"


def candidates(*texts, prompt="Write something", tokens=10):
    return [Candidate(i // 2, i % 2, t, prompt, tokens) for i, t in enumerate(texts)]


def test_rules_name_what_dropped_a_sequence():
    spec = FiltersSpec(min_completion_tokens=5, must_match=r"fox|sums", deduplicate="none")
    found = candidates(" ", "tiny", LONG, "no animals here", "Write something", OTHER)
    found[1].completion_tokens = 2
    Filters(spec).apply(found, [(c.row_index, c.sample_index) for c in found])
    assert [c.dropped_by for c in found] == ["empty", "min_completion_tokens", None, "must_match", "must_match", None]
    echo = candidates("Write something")
    Filters(FiltersSpec(deduplicate="none")).apply(echo, [(0, 0)])
    assert echo[0].dropped_by == "prompt_echo"


def test_near_duplicates_within_a_row_and_across_the_job():
    index = DedupeIndex(near=True, threshold=0.6)
    first = candidates(LONG, NEAR, OTHER, LONG)  # rows 0 (LONG, NEAR) and 1 (OTHER, LONG)
    Filters(FiltersSpec(near_duplicate_threshold=0.6), index).apply(first, [(c.row_index, c.sample_index) for c in first])
    assert [c.dropped_by for c in first] == [None, "near_duplicate", None, "near_duplicate"]
    later = candidates(NEAR)  # another shard, later: repeats row 0's first sample
    Filters(FiltersSpec(near_duplicate_threshold=0.6), index).apply(later, [("x", 0)])
    assert later[0].dropped_by == "near_duplicate"


def test_a_retried_sequence_is_not_its_own_duplicate():
    index = DedupeIndex(near=False, threshold=0.8)
    assert index.check_and_add([(("r1", 0), Print(LONG, False))]) == [False]
    assert index.check_and_add([(("r1", 0), Print(LONG, False))]) == [False]  # the same shard again
    assert index.check_and_add([(("r2", 0), Print(LONG.upper(), False))]) == [True]  # same words, another row
