"""Opening an output for a run: which records are this job's, and what is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.core.spec import spec_from_dict
from jobs.output import OutputConflict, open_output, same_job
from tests.conftest import job_dict, write_prompts


def _spec(tmp_path: Path, model: Path, **sections):
    return spec_from_dict(job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), model, **sections))


def _earlier_release_record(spec) -> dict:
    """A record as an earlier release wrote it: its own fingerprint formula, and a spec
    without fields added since with a default (as input.format was)."""
    recorded = spec.redacted()
    del recorded["input"]["format"], recorded["generation"]["no_repeat_ngram_size"]
    return {"spec": recorded, "fingerprint": "0123456789abcdef", "state": "failed", "runs": [], "counts": {}}


def test_a_record_of_an_earlier_release_is_still_this_job(tmp_path):
    model = tmp_path / "model"
    spec = _spec(tmp_path, model)
    assert same_job(_earlier_release_record(spec), spec)
    other = _spec(tmp_path, model, generation={"max_new_tokens": 9})
    assert not same_job(_earlier_release_record(spec), other)
    assert not same_job({"spec": {"not": "a spec"}, "fingerprint": "x"}, spec)


def test_an_output_an_earlier_release_wrote_resumes(tmp_path):
    write_prompts(tmp_path / "in.parquet", 20)
    spec = _spec(tmp_path, tmp_path / "model")
    out_dir = tmp_path / "out"
    (out_dir / "_commits").mkdir(parents=True)
    (out_dir / "_job.json").write_text(json.dumps(_earlier_release_record(spec)))
    (out_dir / "_commits" / "part-00000.json").write_text(json.dumps({"shard": 0, "rows_done": 10}))
    out, claim, record = open_output(spec, overwrite=False)
    claim.release()
    assert record.fingerprint == spec.fingerprint()
    assert (out_dir / "_commits" / "part-00000.json").exists()  # kept: it is this job's


def test_an_unreadable_record_is_refused_naming_it(tmp_path):
    spec = _spec(tmp_path, tmp_path / "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_job.json").write_text('{"spec": {"na')
    with pytest.raises(OutputConflict.__mro__[1], match="_job.json is not a bulkgen job record"):
        open_output(spec, overwrite=True)
    assert (tmp_path / "out" / "_job.json").read_text() == '{"spec": {"na'


def test_validate_refuses_what_a_run_would(tmp_path, tiny_model):
    from jobs.validate import validate

    write_prompts(tmp_path / "in.parquet", 20)
    spec = _spec(tmp_path, tiny_model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="holds no bulkgen job record"):
        validate(spec)


def test_validate_names_an_input_changed_since_the_job_was_planned(tmp_path, tiny_model):
    from jobs.core.errors import InputChanged
    from jobs.dataset import pin_input
    from jobs.snapshot import InputSnapshot
    from jobs.validate import validate

    write_prompts(tmp_path / "in.parquet", 20)
    spec = _spec(tmp_path, tiny_model)
    record = {"spec": spec.redacted(), "fingerprint": spec.fingerprint(), "state": "succeeded",
              "input": InputSnapshot(10, tuple(pin_input(spec.input))).to_json()}  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_job.json").write_text(json.dumps(record))
    validate(spec)  # the input it was planned on
    write_prompts(tmp_path / "in.parquet", 25)
    with pytest.raises(InputChanged, match=r"rewritten: .*in\.parquet"):
        validate(spec)
