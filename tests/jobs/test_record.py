"""The job record: its states and their transitions, its JSON form (old records included), and how it is kept."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest

from jobs.core.layout import RECORD
from jobs.core.protocol import TALLY_FIELDS, CommitRecord, Tally
from jobs.output import OutputDir
from jobs.record import (
    TRANSITIONS,
    Counts,
    IllegalTransition,
    JobFailure,
    JobRecord,
    JobState,
    RecordKeeper,
    Run,
    committed_counts,
    format_status,
)

S = JobState
FINAL = {S.SUCCEEDED, S.FAILED, S.CANCELLED}
ALLOWED = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
REFUSED = sorted((a, b) for a in S for b in S if b not in TRANSITIONS[a])


def record(state: JobState = S.PENDING) -> JobRecord:
    r = JobRecord({"input": {"uri": "/in"}}, "0123456789abcdef", "test")
    r.state = state  # placed there directly: only the transition under test goes through set_state
    return r


def is_iso_utc(stamp: str) -> bool:
    parsed = datetime.fromisoformat(stamp)
    return parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0


# -- the states --------------------------------------------------------------------------------


def test_states_and_their_json_strings():
    assert [s.value for s in S] == [
        "pending",
        "validating",
        "running",
        "finalizing",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert S("running") is S.RUNNING
    assert S.RUNNING == "running"  # a str enum: compares equal to the string a record holds
    assert {s for s in S if s.final} == FINAL


def test_every_state_has_transitions():
    assert set(TRANSITIONS) == set(S)
    for state in S:
        assert state not in TRANSITIONS[state], f"{state} -> {state}"


def test_the_happy_path_and_where_a_job_can_fail():
    r = record()
    for state in (S.VALIDATING, S.RUNNING, S.FINALIZING, S.SUCCEEDED):
        r.set_state(state)
        assert r.state is state
    for state in S:
        if not state.final:
            assert S.FAILED in TRANSITIONS[state]  # a job can fail from every state before the end
        else:
            assert TRANSITIONS[state] == {S.PENDING}  # a finished job only starts a new run


@pytest.mark.parametrize("before, after", ALLOWED, ids=[f"{a.value}->{b.value}" for a, b in ALLOWED])
def test_every_allowed_transition_works(before, after):
    r = record(before)
    r.set_state(after)
    assert r.state is after


@pytest.mark.parametrize("before, after", REFUSED, ids=[f"{a.value}->{b.value}" for a, b in REFUSED])
def test_every_other_transition_is_illegal(before, after):
    r = record(before)
    with pytest.raises(IllegalTransition, match=f"{before.value} -> {after.value}"):
        r.set_state(after)
    assert r.state is before  # unchanged


@pytest.mark.parametrize(
    "before, after",
    [(S.SUCCEEDED, S.RUNNING), (S.PENDING, S.SUCCEEDED), (S.PENDING, S.RUNNING), (S.CANCELLED, S.FINALIZING)],
)
def test_named_illegal_transitions(before, after):
    assert (before, after) in REFUSED
    with pytest.raises(IllegalTransition):
        record(before).set_state(after)


def test_set_state_stamps_the_times_and_keeps_the_error():
    r = record()
    r.set_state(S.VALIDATING)
    assert r.started_at is None and r.finished_at is None
    r.set_state(S.RUNNING)
    started = r.started_at
    assert started and is_iso_utc(started) and r.updated_at == started
    r.set_state(S.FAILED, JobFailure("boom", "running"))
    assert r.finished_at == r.updated_at and is_iso_utc(r.finished_at)
    assert r.error == JobFailure("boom", "running")
    r.set_state(S.PENDING)
    r.set_state(S.VALIDATING)
    r.set_state(S.RUNNING)
    assert r.started_at == started  # the job's first start, not this run's


# -- runs ----------------------------------------------------------------------------------------


def test_the_first_run_starts_from_pending():
    r = record()
    r.start_run(None)
    assert r.state is S.PENDING
    assert len(r.runs) == 1 and r.run is r.runs[-1]
    assert r.run.ray_address == "local" and is_iso_utc(r.run.started_at)
    assert r.run.finished_at is None and r.run.replicas == {}


@pytest.mark.parametrize("state", [S.SUCCEEDED, S.FAILED, S.CANCELLED, S.RUNNING, S.VALIDATING, S.FINALIZING])
def test_a_new_run_goes_back_to_pending(state):
    # From a finished job (resume, retry-failed) or one whose driver died mid-way.
    r = record(state)
    r.runs.append(Run())
    r.error = JobFailure("the last run's failure", "running")
    r.finished_at = "2024-01-01T00:00:00.000+00:00"
    r.start_run("ray://head:10001")
    assert r.state is S.PENDING
    assert r.error is None and r.finished_at is None
    assert len(r.runs) == 2 and r.run.ray_address == "ray://head:10001"
    r.set_state(S.VALIDATING)  # and the new run proceeds as usual


# -- JSON ------------------------------------------------------------------------------------------


def full_record() -> JobRecord:
    r = record()
    r.counts = Counts(input_rows=10, rows_total=20, rows_done=15, rows_failed=3, shards_total=4, shards_committed=3)
    r.model = {"path": "/m", "replica": {"device": "cpu"}}
    r.start_run("local")
    r.set_state(S.VALIDATING)
    r.set_state(S.RUNNING)
    r.run.first_replica_ready_at = r.run.all_replicas_ready_at = r.updated_at
    r.run.replicas["123"] = {"pid": 123, "loaded_at": r.updated_at, "forward_tokens": 5, "steps": 2}
    r.set_state(S.FAILED, JobFailure("shard part-00003 failed 3 times", "running"))
    return r


def test_to_json_and_back():
    r = full_record()
    doc = r.to_json()
    assert doc["state"] == "failed"
    assert doc["error"] == {"message": "shard part-00003 failed 3 times", "where": "running"}
    assert doc["runs"][0]["replicas"]["123"]["forward_tokens"] == 5
    text = json.dumps(doc)  # plain JSON all the way down
    back = JobRecord.from_json(json.loads(text))
    assert back == r
    assert back.state is S.FAILED and isinstance(back.runs[0], Run) and isinstance(back.error, JobFailure)
    assert back.to_json() == doc


def test_a_minimal_record_loads_with_defaults():
    back = JobRecord.from_json({"spec": {}, "fingerprint": "f"})
    assert back.state is S.PENDING and back.runs == [] and back.error is None and back.counts == Counts()


def test_an_old_record_still_loads():
    # Written by an earlier bulkgen: extra keys everywhere, epoch-second run times, an error with a shard.
    old = {
        "spec": {"input": {"uri": "/in"}},
        "fingerprint": "0123456789abcdef",
        "name": "old",
        "state": "failed",
        "counts": {"input_rows": 4, "rows_total": 4, "rows_done": 2, "shards_failed": 1},
        "model": {"path": "/m"},
        "versions": {"python": "3.11.7"},
        "created_at": "2024-05-01T10:00:00+00:00",
        "updated_at": "2024-05-01T10:05:00+00:00",
        "started_at": "2024-05-01T10:01:00+00:00",
        "finished_at": "2024-05-01T10:05:00+00:00",
        "runs": [
            {
                "started_at": "2024-05-01T10:00:00+00:00",
                "host": "h",
                "user": "u",
                "pid": 42,
                "ray_address": "local",
                "first_replica_ready_at": 1714557700.5,
                "all_replicas_ready_at": 1714557701.0,
                "tokens_per_s": 12.5,
            }
        ],
        "error": {"message": "shard part-00001 failed 3 times", "where": "driver", "shard": 1},
        "heartbeat": 7,
    }
    r = JobRecord.from_json(old)
    assert r.state is S.FAILED and r.name == "old"
    assert r.counts == Counts(input_rows=4, rows_total=4, rows_done=2)
    assert r.run.pid == 42 and r.run.first_replica_ready_at == 1714557700.5
    assert r.error == JobFailure("shard part-00001 failed 3 times", "driver")
    assert "heartbeat" not in r.to_json() and "tokens_per_s" not in r.to_json()["runs"][0]
    # And it resumes: a new run starts from the failed state.
    r.start_run(None)
    assert r.state is S.PENDING and len(r.runs) == 2 and r.error is None
    json.dumps(r.to_json())


def test_committed_counts_sum_every_tally_counter_into_counts():
    def committed(shard: int, tally: Tally) -> CommitRecord:
        return CommitRecord(shard, f"part-{shard:05d}", "attempt-0", f"data/part-{shard:05d}.parquet", None, None,
                            tally)  # fmt: skip

    tallies = [Tally(rows_done=5, rows_cached=2, prompt_tokens=40), Tally(rows_done=3, rows_failed=1, rows_filtered=4)]
    counts = committed_counts(committed(i, t) for i, t in enumerate(tallies))
    assert counts == {"shards_committed": 2, **(tallies[0] + tallies[1]).to_json()}
    assert committed_counts([]) == {"shards_committed": 0, **Tally().to_json()}
    # Each counter a stage adds to the tally has its place in the record's counts.
    assert set(TALLY_FIELDS) <= set(Counts.__dataclass_fields__)


def test_format_status_shows_state_counts_and_error():
    text = format_status(full_record(), "/out")
    assert "state:    failed" in text
    assert "rows:     18/20 (90.0%)  done 15  failed 3" in text
    assert "error:    shard part-00003 failed 3 times  (in running)" in text


# -- the keeper ----------------------------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path) -> OutputDir:
    if request.param == "memory":
        out = OutputDir(f"memory://record-{uuid.uuid4().hex[:8]}", {})
        yield out
        out.fs.rm(out.root, recursive=True)
    else:
        yield OutputDir(str(tmp_path / "out"), {})


def test_move_to_persists_every_state_change(out):
    keeper = RecordKeeper(out, record())
    keeper.record.start_run(None)
    for state in (S.VALIDATING, S.RUNNING, S.FINALIZING, S.SUCCEEDED):
        keeper.move_to(state)
        on_disk = out.read_json(RECORD)
        assert on_disk["state"] == state.value
        assert JobRecord.from_json(on_disk) == keeper.record


def test_an_illegal_move_raises_and_persists_nothing(out):
    keeper = RecordKeeper(out, record())
    keeper.move_to(S.VALIDATING)
    before = out.read_json(RECORD)
    with pytest.raises(IllegalTransition):
        keeper.move_to(S.SUCCEEDED)
    assert out.read_json(RECORD) == before
    assert keeper.record.state is S.VALIDATING


def test_fail_records_where_the_job_was(out):
    keeper = RecordKeeper(out, record())
    keeper.move_to(S.VALIDATING)
    keeper.move_to(S.RUNNING)
    keeper.fail("replicas fail to start")
    doc = out.read_json(RECORD)
    assert doc["state"] == "failed"
    assert doc["error"] == {"message": "replicas fail to start", "where": "running"}


def test_save_every_throttles_heartbeats(out):
    keeper = RecordKeeper(out, record())
    keeper.move_to(S.VALIDATING)
    keeper.record.counts.rows_done = 7
    keeper.save(every=3600.0)  # just written: skipped
    assert out.read_json(RECORD)["counts"]["rows_done"] == 0
    keeper.save()  # unconditional
    assert out.read_json(RECORD)["counts"]["rows_done"] == 7
