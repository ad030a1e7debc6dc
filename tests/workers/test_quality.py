"""Filters and the job's duplicate index, without Ray (workers/quality.py, jobs/dedupe_index.py)."""

from __future__ import annotations

from jobs.core.dedupe import Print
from jobs.core.plan import Shard
from jobs.core.protocol import ShardTask, Tally
from jobs.core.spec import FiltersSpec, spec_from_dict
from jobs.dedupe_index import DedupeIndex
from tests.conftest import job_dict
from workers.quality import Candidate, Filters
from workers.stages.filter import Filter
from workers.stages.work import Generated, Prompt, ShardWork

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


def test_min_mean_logprob_drops_what_the_model_found_unlikely():
    found = candidates(LONG, NEAR, OTHER, "no logprobs here")
    for c, mean in zip(found, (-2.5, -0.4, -1.0, None)):  # -1.0: at the bound, kept
        c.mean_logprob = mean
    spec = FiltersSpec(min_mean_logprob=-1.0, deduplicate="none")
    Filters(spec).apply(found, [(c.row_index, c.sample_index) for c in found])
    assert [c.dropped_by for c in found] == ["min_mean_logprob", None, None, None]


def test_the_filter_stage_reads_the_mean_from_the_logprobs_column(tmp_path):
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path / "model",
                                   generation={"max_new_tokens": 8, "logprobs": True},
                                   filters={"min_mean_logprob": -1.0, "deduplicate": "none"}))  # fmt: skip
    texts = (LONG, NEAR, OTHER, "no tokens: no mean")
    # (logprob_sum, completion_tokens): means -2.0, -0.5, null (a batch line that asked for none), no tokens
    logprobs = ((-8.0, 4), (-2.0, 4), (None, 4), (0.0, 0))
    work = ShardWork(
        ShardTask(Shard(0, "in/p.parquet", "p.parquet", 0, 4), "attempt-0"),
        ids=["a", "b", "c", "d"],
        samples=[range(1)] * 4,
        prompts={i: Prompt("Write something", [1, 2]) for i in range(4)},
        generated={i: Generated(t, "stop", n, columns={"logprob_sum": total})
                   for i, (t, (total, n)) in enumerate(zip(texts, logprobs))},
    )  # fmt: skip
    done = Filter(spec).run(work)
    assert [done.generated[i].dropped_by for i in range(4)] == ["min_mean_logprob", None, None, None]
    assert done.tally == Tally(rows_filtered=1)

