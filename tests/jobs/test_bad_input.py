"""Every bad input fails with a clear error before any model is loaded or any cluster is started."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import transformers

import jobs.validate
from jobs import preflight
from jobs.cli import main
from jobs.core.errors import BadInput, InputError, ModelError, OutputError, SpecError
from jobs.core.spec import load_spec, spec_from_dict
from jobs.driver import run_job
from jobs.validate import check_input_and_model, replicas_check_the_model, validate
from tests.conftest import job_dict, write_job, write_prompts
from tests.tiny_model import save_without_weight

MISSING_WEIGHT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def nothing_heavy_starts(monkeypatch):
    """Fail the test if a model's weights are loaded or Ray is started; check Ray is left as found."""

    def no_model(*args, **kwargs):
        raise AssertionError(f"a model was loaded before the input was validated: {args}")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the input was validated")

    was_initialized = ray.is_initialized()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(ray, "init", no_ray)
    yield
    assert ray.is_initialized() is was_initialized
    if not was_initialized:
        assert ray.is_initialized() is False


def fails_early(spec, error: type[Exception], *fragments: str) -> str:
    """Both entry points refuse the spec with `error`; returns the message, checked for `fragments`."""
    assert issubclass(error, BadInput)  # bad input is what the CLI reports as exit 2
    with pytest.raises(error) as by_validate:
        validate(spec)
    with pytest.raises(error) as by_run:
        run_job(spec, progress=False)
    message = str(by_run.value)
    assert str(by_validate.value) == message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # The failure is recorded in the output's job record, and no results were staged or written.
    out = Path(spec.output.uri)
    record = json.loads((out / "_job.json").read_text())
    assert record["state"] == "failed"
    assert record["error"] == {"message": message, "where": "validating"}
    written = {p.name for p in out.iterdir()}
    assert not written & {"data", "errors", "_staging", "_commits", "_manifest.json", "_SUCCESS"}, written
    return message


def make_spec(tmp_path, model_path, model_fields: dict | None = None, **sections):
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model_path, **sections)
    data["model"].update(model_fields or {})
    return spec_from_dict(data)


@pytest.fixture
def prompts(tmp_path) -> Path:
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    write_prompts(tmp_path / "in" / "b.parquet", 6, start=6)
    return tmp_path / "in"


# -- input files ----------------------------------------------------------------------------


def test_missing_input_path(tmp_path, tiny_model, nothing_heavy_starts):
    spec = make_spec(tmp_path, tiny_model)
    fails_early(spec, InputError, "input.uri", str(tmp_path / "in"), "does not exist")


def test_directory_without_parquet_files(tmp_path, tiny_model, nothing_heavy_starts):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "prompts.csv").write_text("id,prompt\n1,hi\n")
    (tmp_path / "in" / "_hidden.parquet").write_bytes(b"")  # hidden: not data
    spec = make_spec(tmp_path, tiny_model)
    fails_early(spec, InputError, "input.uri", str(tmp_path / "in"), "no Parquet files")


def test_glob_matching_nothing(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    spec = make_spec(tmp_path, tiny_model, input={"uri": str(prompts / "*.jsonl")})
    fails_early(spec, InputError, "*.jsonl", "no Parquet files")


def test_file_that_is_not_parquet(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    (prompts / "c.parquet").write_text("id,prompt\n1,hi\n")
    spec = make_spec(tmp_path, tiny_model)
    fails_early(spec, InputError, "c.parquet", "not readable Parquet")


# -- columns -------------------------------------------------------------------------------------


def test_missing_prompt_column(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    spec = make_spec(tmp_path, tiny_model, input={"prompt_column": "text"})
    fails_early(spec, InputError, "input.prompt_column", "'text'", "a.parquet", "'prompt'")


def test_missing_column_in_a_later_file(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    pq.write_table(pa.table({"id": ["z-1"], "body": ["hi"], "topic": ["t"]}), prompts / "c.parquet")
    spec = make_spec(tmp_path, tiny_model)
    fails_early(spec, InputError, "input.prompt_column", "c.parquet")


def test_template_naming_an_absent_column(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    spec = make_spec(
        tmp_path, tiny_model, input={"prompt_column": None, "prompt_template": "A {style} poem in a {mood} mood"}
    )
    message = fails_early(spec, InputError, "input.prompt_template", "'mood'")
    assert "'style'" not in message.split("does not have")[0]  # only the absent column is named


def test_pass_through_column_absent(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    spec = make_spec(tmp_path, tiny_model, input={"pass_through": ["topic", "author"]})
    fails_early(spec, InputError, "input.pass_through", "'author'")


def test_messages_column_that_is_not_a_list(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    spec = make_spec(tmp_path, tiny_model, input={"prompt_column": None, "messages_column": "prompt"})
    fails_early(spec, InputError, "input.messages_column", "'prompt'", "string")


# -- ids -------------------------------------------------------------------------------------------


def test_duplicate_ids_name_the_value_and_files(tmp_path, tiny_model, nothing_heavy_starts):
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    write_prompts(tmp_path / "in" / "b.parquet", 6, start=3)  # row-00003..row-00005 again
    spec = make_spec(tmp_path, tiny_model)
    message = fails_early(spec, InputError, "input.id_column", "'id'", "not unique", "a.parquet", "b.parquet")
    assert any(f"'row-0000{i}'" in message for i in (3, 4, 5)), message


def test_duplicate_ids_within_one_file(tmp_path, tiny_model, nothing_heavy_starts):
    pq.write_table(
        pa.table({"id": [1, 2, 3, 2], "prompt": ["a", "b", "c", "d"], "topic": ["t"] * 4}),
        tmp_path / "in.parquet",
        row_group_size=2,
    )
    spec = make_spec(tmp_path, tiny_model, input={"uri": str(tmp_path / "in.parquet")})
    with pytest.raises(InputError, match=r"not unique: 2 appears in .*in\.parquet"):
        validate(spec)


def test_null_id(tmp_path, tiny_model, nothing_heavy_starts):
    pq.write_table(
        pa.table({"id": ["a", "b", None, "d"], "prompt": ["p"] * 4, "topic": ["t"] * 4}), tmp_path / "in.parquet"
    )
    spec = make_spec(tmp_path, tiny_model, input={"uri": str(tmp_path / "in.parquet")})
    fails_early(spec, InputError, "input.id_column", "'id'", "null", "in.parquet", "row 2 of")


def test_null_id_names_its_row_in_the_file(tmp_path, tiny_model):
    ids = [f"r{i}" for i in range(8)]
    ids[5] = None
    pq.write_table(
        pa.table({"id": ids, "prompt": ["p"] * 8, "topic": ["t"] * 8}), tmp_path / "in.parquet", row_group_size=2
    )
    spec = make_spec(tmp_path, tiny_model, input={"uri": str(tmp_path / "in.parquet")})
    with pytest.raises(InputError, match=r"null in row 5 of .*in\.parquet"):
        validate(spec)


# -- the spec itself ------------------------------------------------------------------------------


def test_unknown_spec_field_in_yaml(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model)
    data["generation"]["max_tokens"] = 16
    path = write_job(tmp_path / "job.yaml", data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "generation.max_tokens: unknown field" in str(info.value)
    assert not (tmp_path / "out").exists()


# -- the model --------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path, prompts, nothing_heavy_starts):
    missing = tmp_path / "models" / "not-there"
    spec = make_spec(tmp_path, missing)
    fails_early(spec, ModelError, "model.path", str(missing), "does not exist")


def test_model_directory_without_config(tmp_path, prompts, nothing_heavy_starts):
    (tmp_path / "empty-model").mkdir()
    spec = make_spec(tmp_path, tmp_path / "empty-model")
    fails_early(spec, ModelError, "model.path", "config.json")


@pytest.fixture(scope="module")
def model_without_chat_template(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "no-chat"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(path).chat_template is None
    return path


def test_messages_column_with_a_tokenizer_without_chat_template(
    tmp_path, model_without_chat_template, nothing_heavy_starts
):
    messages = [[{"role": "user", "content": f"hello {i}"}] for i in range(3)]
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "messages": messages, "topic": ["t"] * 3}), tmp_path / "chat.parquet"
    )
    spec = make_spec(
        tmp_path,
        model_without_chat_template,
        input={"uri": str(tmp_path / "chat.parquet"), "prompt_column": None, "messages_column": "messages"},
    )
    fails_early(spec, ModelError, "input.messages_column", "no chat template", str(model_without_chat_template))


@pytest.fixture(scope="module")
def pickle_only_model(tiny_model, tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("models") / "pickle-only"
    shutil.copytree(tiny_model, path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_pickle_only_weights_are_refused_by_default(tmp_path, prompts, pickle_only_model, nothing_heavy_starts):
    spec = make_spec(tmp_path, pickle_only_model)
    assert spec.model.use_safetensors is True
    fails_early(spec, ModelError, "model.path", "pickle", "model.use_safetensors: false")


def test_pickle_only_weights_pass_when_allowed(tmp_path, prompts, pickle_only_model, nothing_heavy_starts):
    spec = make_spec(tmp_path, pickle_only_model, model_fields={"use_safetensors": False})
    checked = validate(spec)
    assert checked.input_rows == 12
    assert checked.model["weights_sha256"]


@pytest.fixture(scope="module")
def model_missing_a_weight(tiny_model, tmp_path_factory) -> Path:
    return save_without_weight(tiny_model, tmp_path_factory.mktemp("models") / "missing", MISSING_WEIGHT)


def test_a_checkpoint_missing_weights_is_refused_by_validate(tmp_path, prompts, model_missing_a_weight):
    # `bulkgen validate` builds the meta model always; `run` on a local Ray leaves this to the replicas
    # (tests/workers/test_engine.py, tests/faults/test_start_up.py).
    with pytest.raises(ModelError) as refused:
        validate(make_spec(tmp_path, model_missing_a_weight))
    assert str(model_missing_a_weight) in str(refused.value) and MISSING_WEIGHT in str(refused.value)


def test_run_on_a_local_ray_leaves_the_model_to_the_replicas(tmp_path, tiny_model, prompts, monkeypatch):
    """No meta model and no tokenizer in the driver (torch and transformers stay out of it) unless a
    check reads the tokenizer; the replicas check the model as they load it."""

    def no_model(spec):
        raise AssertionError("the driver built the meta model")

    def no_tokenizer(model):
        raise AssertionError("the driver loaded the tokenizer")

    monkeypatch.setattr(preflight, "check_model_loadable", no_model)
    monkeypatch.setattr(jobs.validate, "load_tokenizer", no_tokenizer)
    spec = make_spec(tmp_path, tiny_model)
    checked = check_input_and_model(spec, replicas_check_model=True)
    assert (checked.input_rows, checked.context) == (12, None) and checked.model["weights_sha256"]
    with pytest.raises(AssertionError, match="meta model"):
        check_input_and_model(spec)  # validate's way
    # A spec whose checks read the tokenizer still loads it.
    reads = [{"generation": {"structured": {"choices": ["a"]}}}, {"generation": {"reasoning": "auto"}},
             {"input": {"prompt_column": None, "messages_column": "messages"}}]  # fmt: skip
    assert not preflight.reads_tokenizer(spec)
    assert all(preflight.reads_tokenizer(make_spec(tmp_path, tiny_model, **sections)) for sections in reads)


def test_the_replicas_check_the_model_only_on_this_machines_ray(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert replicas_check_the_model(make_spec(tmp_path, tiny_model), None)  # transformers
    assert replicas_check_the_model(make_spec(tmp_path, tiny_model, model_fields={"engine": "auto"}), None)
    assert not replicas_check_the_model(make_spec(tmp_path, tiny_model), "ray://head:10001")
    assert not replicas_check_the_model(make_spec(tmp_path, tiny_model, model_fields={"engine": "vllm"}), None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert not replicas_check_the_model(make_spec(tmp_path, tiny_model), None)


def test_valid_input_passes_validation_without_loading_the_model(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    # The counterpart of every test above: the guard lets a good job through validation.
    checked = validate(make_spec(tmp_path, tiny_model))
    assert checked.input_rows == 12
    assert [(s.relpath, s.start, s.stop) for s in checked.shards] == [("a.parquet", 0, 6), ("b.parquet", 0, 6)]


# -- the command line -------------------------------------------------------------------------------


def test_cli_run_exits_2_with_the_message(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model, input={"prompt_column": "text"})
    path = write_job(tmp_path / "job.yaml", data)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bulkgen: error: ")
    assert "input.prompt_column" in err and "'text'" in err
    assert "Traceback" not in err


def test_reasoning_auto_with_a_tokenizer_that_shows_no_tags(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model, generation={"reasoning": "auto"})
    cli_refuses(
        write_job(tmp_path / "job.yaml", data), capsys,
        "generation.reasoning is auto", str(tiny_model), "<think>…</think>", "{start, end}", "reasoning: off",
    )  # fmt: skip


def test_cli_validate_exits_2_on_unknown_field(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(tmp_path / "out"), tiny_model, extra=1))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bulkgen: error:" in err and "extra: unknown field" in err


def test_cli_bad_override_exits_2(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    path = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(tmp_path / "out"), tiny_model))
    assert main(["run", str(path), "--set", "generation.max_new_tokens=0", "--no-progress"]) == 2
    assert "generation.max_new_tokens" in capsys.readouterr().err


# -- every refusal through the command line: exit 2, the field named, nothing heavy started ----------


def cli_refuses(job: Path, capsys, *fragments: str) -> str:
    """`bulkgen validate` and `bulkgen run` both exit 2 with one `bulkgen: error:` line naming `fragments`."""
    errors = []
    for command in (["validate", str(job)], ["run", str(job), "--no-progress"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("bulkgen: error: "), err
        assert "Traceback" not in err and "internal error" not in err, err
        for fragment in fragments:
            assert fragment in err, f"{command[0]}: {fragment!r} not in {err!r}"
        errors.append(err)
    assert errors[0] == errors[1]
    return errors[1]


def output_refused(job: Path, *fragments: str) -> None:
    """validate() and run_job() both raise OutputError for the spec in `job`."""
    spec = load_spec(job)
    for entry in (validate, lambda spec: run_job(spec, progress=False)):
        with pytest.raises(OutputError) as info:
            entry(spec)
        for fragment in fragments:
            assert fragment in str(info.value)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# Output errors are found before the output is claimed: nothing is written there, not even _job.json.


def test_output_uri_that_is_an_existing_file(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    (tmp_path / "out").write_text("not a directory")
    job = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(tmp_path / "out"), tiny_model))
    cli_refuses(job, capsys, "output.uri", str(tmp_path / "out"), "is a file")
    output_refused(job, "output.uri", "is a file")
    assert (tmp_path / "out").read_text() == "not a directory"
    assert not list(tmp_path.rglob("_job.json"))


def test_output_inside_a_directory_inputs_root(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    before = files_under(prompts)
    out = prompts / "results"
    job = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(out), tiny_model))
    cli_refuses(job, capsys, "output.uri", str(out), "inside the input's root")
    output_refused(job, "inside the input's root")
    # Not a byte is written into the input's tree: the next run would read it as prompts.
    assert files_under(prompts) == before
    assert not out.exists()


def test_output_that_is_a_glob_inputs_root(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    before = files_under(prompts)
    job = write_job(tmp_path / "job.yaml", job_dict(str(prompts / "*.parquet"), str(prompts), tiny_model))
    cli_refuses(job, capsys, "output.uri", str(prompts), "inside the input's root")
    assert files_under(prompts) == before


def test_output_beside_a_single_file_input_is_fine(tmp_path, tiny_model, prompts, nothing_heavy_starts):
    # The counterpart: a one-file input's directory may hold the output.
    checked = validate(
        make_spec(tmp_path, tiny_model, input={"uri": str(prompts / "a.parquet")}, output={"uri": str(prompts / "out")})
    )
    assert checked.input_rows == 6


_AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "FSSPEC_S3_KEY",
    "FSSPEC_S3_SECRET",
    "FSSPEC_S3_TOKEN",
)


@pytest.fixture
def s3_without_credentials(s3, monkeypatch, tmp_path):
    """A real bucket on the loopback S3 server, and an environment where botocore finds no credentials."""
    import s3fs

    for name in _AWS_CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookups either
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem that already holds credentials
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()  # nor one without them for the next test


@pytest.mark.s3
def test_s3_output_without_credentials(
    tmp_path, tiny_model, prompts, capsys, s3_without_credentials, nothing_heavy_starts
):
    import s3fs

    s3 = s3_without_credentials
    uri = f"s3://{s3['bucket']}/out"
    data = job_dict(str(prompts), uri, tiny_model, output={"uri": uri, "storage_options": s3["options"]})
    job = write_job(tmp_path / "job.yaml", data)
    err = cli_refuses(job, capsys, "output.uri", uri, "credentials")
    output_refused(job, "output.uri", "NoCredentialsError")
    assert "storage_options" in err  # says where credentials would go
    # Nothing reached the bucket (looked at with credentials given explicitly, not from the environment).
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True, **s3["options"])
    assert fs.ls(s3["bucket"], refresh=True) == []


# Input errors are found after the output is claimed: `run` records them as the job's failure.


def refused_input_recorded(tmp_path: Path, err: str) -> None:
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["state"] == "failed"
    assert record["error"]["where"] == "validating"
    assert record["error"]["message"] in err
    # Nothing but the record, the run's log, which says why it failed, and the run's released claim.
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"_job.json", "_logs", "_claims"}
    assert json.loads((tmp_path / "out" / "_claims" / "run-00001.json").read_text())["released_at"]
    assert record["error"]["message"] in (tmp_path / "out" / "_logs" / "run-1.log").read_text()


def test_prompt_column_that_is_not_text(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": [1, 2], "topic": ["t", "t"]}), tmp_path / "in.parquet")
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model))
    err = cli_refuses(job, capsys, "input.prompt_column", "'prompt'", "int64", "in.parquet")
    refused_input_recorded(tmp_path, err)


@pytest.mark.parametrize(
    "messages, fragments",
    [
        (
            [[{"role": "user", "text": f"hello {i}"}] for i in range(2)],  # structs without content
            ("'messages'", "role", "content"),
        ),
        ([["hi", "there"], ["yo"]], ("has type list<", ": string>", "{role, content}")),  # strings
    ],
    ids=["structs-without-content", "strings"],
)
def test_messages_column_of_the_wrong_type(tmp_path, tiny_model, capsys, nothing_heavy_starts, messages, fragments):
    pq.write_table(pa.table({"id": ["a", "b"], "messages": messages, "topic": ["t", "t"]}), tmp_path / "chat.parquet")
    data = job_dict(
        str(tmp_path / "chat.parquet"),
        str(tmp_path / "out"),
        tiny_model,
        input={"prompt_column": None, "messages_column": "messages"},
    )
    err = cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "input.messages_column", *fragments)
    refused_input_recorded(tmp_path, err)


def test_nested_id_column(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    pq.write_table(pa.table({"id": [[1, 2], [3]], "prompt": ["p", "q"], "topic": ["t", "t"]}), tmp_path / "in.parquet")
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model))
    err = cli_refuses(job, capsys, "input.id_column", "'id'", "has type list<", ": int64>", "scalar ids")
    refused_input_recorded(tmp_path, err)


# -- structured output: a schema no row could follow is refused before the model loads ---------------


def write_row_schemas(path: Path, schemas: list, start: int = 0, row_group_size: int | None = None) -> None:
    write_prompts(path, len(schemas), start=start, row_group_size=row_group_size)
    table = pq.read_table(path).append_column("schema", pa.array(schemas, pa.string()))
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize(
    "bad, fragments",
    [
        ('{"type": "object", ', ("is not JSON (Expecting",)),
        ('{"type": "array", "uniqueItems": true}', ('has a schema llguidance cannot use: Unimplemented keys: ["uniqueItems"]',)),
    ],
    ids=["not-json", "unimplemented"],
)  # fmt: skip
def test_a_bad_row_schema_names_its_row_and_file(tmp_path, tiny_model, nothing_heavy_starts, bad, fragments):
    good = '{"type": "string"}'
    write_row_schemas(tmp_path / "in" / "a.parquet", [good, None, good, good])
    write_row_schemas(tmp_path / "in" / "b.parquet", [good, None, good, bad, good], start=4, row_group_size=2)
    spec = make_spec(tmp_path, tiny_model, input={"schema_column": "schema"})
    fails_early(spec, InputError, "input.schema_column 'schema': row 'row-00007' of b.parquet ", *fragments)


def test_a_row_schema_without_an_id_column_is_named_by_file_and_row(tmp_path, tiny_model, nothing_heavy_starts):
    write_row_schemas(tmp_path / "in" / "a.parquet", ['{"type": "string"}', "[]"], row_group_size=1)
    spec = make_spec(tmp_path, tiny_model, input={"schema_column": "schema", "id_column": None})
    fails_early(spec, InputError, "row 'a.parquet:1' of a.parquet is JSON list, not a JSON schema object")


def test_a_schema_column_of_the_wrong_type_or_absent(tmp_path, tiny_model, capsys, nothing_heavy_starts):
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "topic": ["t"], "schema": [1]}), tmp_path / "in.parquet")
    data = job_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model, input={"schema_column": "schema"})
    cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "input.schema_column 'schema'", "has type int64",
                "expected text (a JSON schema as a JSON string)")  # fmt: skip
    data["input"]["schema_column"] = "schemas"
    cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "input.schema_column names column(s) ['schemas']")


def test_a_job_schema_llguidance_cannot_use_exits_2(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    schema = {"type": "array", "uniqueItems": True}
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model, generation={"structured": {"json_schema": schema}})
    cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "generation.structured.json_schema: llguidance cannot "
                'use this schema: Unimplemented keys: ["uniqueItems"]')  # fmt: skip


def test_structured_output_needs_a_fast_tokenizer(tmp_path, tiny_model):
    from types import SimpleNamespace

    from jobs.preflight import check_tokenizer

    spec = make_spec(tmp_path, tiny_model, generation={"structured": {"choices": ["a"]}})
    slow = SimpleNamespace(is_fast=False, chat_template=None)
    with pytest.raises(ModelError, match=r"generation.structured needs a fast tokenizer \(tokenizer.json\); model.tokenizer"):
        check_tokenizer(spec, slow)
    check_tokenizer(make_spec(tmp_path, tiny_model), slow)  # no constraint: any tokenizer


def test_vllms_structured_outputs_config_is_the_specs_to_set(tmp_path, tiny_model, prompts, capsys, nothing_heavy_starts):
    data = job_dict(str(prompts), str(tmp_path / "out"), tiny_model)
    data["model"] = {"path": str(tiny_model), "engine": "vllm", "engine_options": {"structured_outputs_config": {}}}
    cli_refuses(write_job(tmp_path / "job.yaml", data), capsys, "model.engine_options.structured_outputs_config: set "
                "generation.structured.whitespace in the spec instead")  # fmt: skip


def test_row_schemas_that_are_good_or_null_pass(tmp_path, tiny_model, nothing_heavy_starts):
    write_row_schemas(tmp_path / "in" / "a.parquet", ['{"type": "string"}', None, '{"enum": ["a"]}'])
    assert validate(make_spec(tmp_path, tiny_model, input={"schema_column": "schema"})).input_rows == 3


def test_a_well_formed_chat_input_passes(tmp_path, tiny_model, nothing_heavy_starts):
    # The counterpart of the type checks above.
    messages = [[{"role": "user", "content": f"hello {i}"}] for i in range(2)]
    pq.write_table(pa.table({"id": [7, 8], "messages": messages, "topic": ["t", "t"]}), tmp_path / "chat.parquet")
    spec = make_spec(
        tmp_path,
        tiny_model,
        input={"uri": str(tmp_path / "chat.parquet"), "prompt_column": None, "messages_column": "messages"},
    )
    assert validate(spec).input_rows == 2


# -- an internal error is not bad input -------------------------------------------------------------


def write_fault(fault_dir: Path, point: str, rule: dict) -> Path:
    fault_dir.mkdir(parents=True, exist_ok=True)
    (fault_dir / f"{point}.json").write_text(json.dumps(rule))
    return fault_dir


def test_an_internal_error_exits_1_with_a_traceback(tmp_path, tiny_model, prompts):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    # A builtin ValueError from inside the driver is a bug, not the user's input, though ValueError is BadInput's base.
    faults = write_fault(tmp_path / "faults", "driver.validate", {"action": "raise", "error": "ValueError"})
    job = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(tmp_path / "out"), tiny_model))
    env = {**os.environ, "BULKGEN_FAULTS": str(faults), "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(job), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "internal error" in done.stderr
    assert "Traceback" in done.stderr
    assert "ValueError: injected fault at driver.validate" in done.stderr
    assert "bulkgen: error:" not in done.stderr  # not reported as bad input
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["state"] == "failed"
    assert record["error"] == {"message": "ValueError: injected fault at driver.validate", "where": "validating"}
    trace = [json.loads(line) for line in (faults / "trace.jsonl").read_text().splitlines()]
    points = [t["point"] for t in trace]
    assert points.count("driver.validate") == 1
    assert not [p for p in points if p.startswith(("replica.", "engine."))], points  # it stopped there: no replica


def test_an_internal_error_in_process(tmp_path, tiny_model, prompts, capsys, caplog, monkeypatch, nothing_heavy_starts):
    faults = write_fault(tmp_path / "faults", "driver.validate", {"action": "raise", "error": "ValueError"})
    monkeypatch.setenv("BULKGEN_FAULTS", str(faults))
    job = write_job(tmp_path / "job.yaml", job_dict(str(prompts), str(tmp_path / "out"), tiny_model))
    assert main(["run", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bulkgen: internal error: ValueError: injected fault at driver.validate"), err
    logged = [r for r in caplog.records if r.name == "bulkgen" and r.getMessage() == "internal error"]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is ValueError  # the traceback is in the log
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["state"] == "failed"
