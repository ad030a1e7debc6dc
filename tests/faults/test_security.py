"""Untrusted checkpoints and secrets: code shipped with a checkpoint never runs unless the
spec trusts it, pickle weights are refused unless allowed, storage secrets are never written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from jobs.core.spec import spec_from_dict
from jobs.driver import JobError, run_job
from jobs.validate import validate
from tests.conftest import REPO, job_dict, write_job, write_prompts
from tests.faults.conftest import check_output, read_record, run_cli
from workers.transformers_engine import TransformersEngine

pytestmark = [pytest.mark.faults]

CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("checkpoint code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _remote_code_checkpoint(tiny_model: Path, where: Path, model_type: str, marker: Path) -> Path:
    """The tiny model plus evil.py, which config.json's auto_map points at; importing it writes `marker`."""
    shutil.copytree(tiny_model, where)
    (where / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((where / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (where / "config.json").write_text(json.dumps(config))
    return where


def _spec(tmp_path: Path, model: Path, **model_fields):
    write_prompts(tmp_path / "in" / "p.parquet", 10)
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), model)
    data["model"].update(model_fields)
    return data, spec_from_dict(data)


@pytest.mark.ray
def test_remote_code_needs_trust(fault_ray, faults, tiny_model, tmp_path, capsys):
    marker = tmp_path / "MARKER"

    # A known architecture with an auto_map: loaded with the library's own code; evil.py never imported.
    known = _remote_code_checkpoint(tiny_model, tmp_path / "known", "llama", marker)
    data, spec = _spec(tmp_path / "a", known)
    assert cli_main(["validate", str(write_job(tmp_path / "a.yaml", data))]) == 0
    model = TransformersEngine.from_spec(spec).model  # the loading code every replica runs
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()

    # An architecture only the checkpoint's code defines: refused, naming trust_remote_code.
    custom = _remote_code_checkpoint(tiny_model, tmp_path / "custom", "evil-llama", marker)
    data, spec = _spec(tmp_path / "b", custom)
    assert cli_main(["validate", str(write_job(tmp_path / "b.yaml", data))]) == 2
    assert "custom code" in capsys.readouterr().err
    with pytest.raises(ValueError, match="custom code"):
        TransformersEngine.from_spec(spec)
    # The job: the driver's checks pass it, and the replicas, where the code would run, refuse it.
    with pytest.raises((ValueError, JobError), match="trust_remote_code"):
        run_job(spec, progress=False)
    assert read_record(str(tmp_path / "b" / "out"))["state"] == "failed"
    assert not marker.exists()

    # The marker is real: trusting the checkpoint does run its code (in a child process,
    # with transformers' module cache in tmp_path).
    trusted = subprocess.run(
        [sys.executable, "-c", "import sys; from transformers import AutoConfig; "
         "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)", str(custom)],
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "checkpoint code ran"


class _RunsCode:
    """Unpickling this creates a directory: the stand-in for code a pickle runs when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_pickle_weights_refused_unless_allowed(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    marker = tmp_path / "PICKLE_RAN"
    # A checkpoint whose only weights are a pickle that runs code when unpickled.
    evil = tmp_path / "evil"
    shutil.copytree(tiny_model, evil)
    (evil / "model.safetensors").unlink()
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _RunsCode(str(marker))}, f, protocol=2)  # torch.save's

    data, spec = _spec(tmp_path / "a", evil)
    with pytest.raises(ValueError, match="use_safetensors: false"):
        validate(spec)
    done = run_cli("validate", str(write_job(tmp_path / "a.yaml", data)))
    assert done.returncode == 2 and "pickle" in done.stderr, done.stderr
    with pytest.raises(ValueError, match="pickle"):
        run_job(spec, progress=False)
    assert read_record(str(tmp_path / "a" / "out"))["error"]["where"] == "validating"
    assert not marker.exists()

    # Allowed explicitly, a real pickle checkpoint loads...
    legit = tmp_path / "legit"
    shutil.copytree(tiny_model, legit)
    (legit / "model.safetensors").unlink()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.save(reference.state_dict(), legit / "pytorch_model.bin")
    _, spec = _spec(tmp_path / "b", legit, use_safetensors=False)
    validate(spec)
    model = TransformersEngine.from_spec(spec).model
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    # ...and even then the code-running pickle is not run (weights-only unpickling).
    _, spec = _spec(tmp_path / "c", evil, use_safetensors=False)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TransformersEngine.from_spec(spec)
    assert not marker.exists()


@pytest.mark.ray
def test_storage_secret_never_written(fault_ray, faults, tiny_model, tmp_path):
    secret = "SECRET-d0c1f2e3b4a5"
    write_prompts(tmp_path / "in" / "p.parquet", 20)
    out = tmp_path / "out"
    # Local files take (and ignore) extra storage options, the way a credential reaches s3fs.
    data = job_dict(
        str(tmp_path / "in"),
        str(out),
        tiny_model,
        input={"storage_options": {"token": secret}},
        output={"storage_options": {"token": secret}},
    )
    assert run_job(spec_from_dict(data), progress=False).state == "succeeded"
    result = check_output(str(out), [f"row-{i:05d}" for i in range(20)])
    assert result.record["spec"]["output"]["storage_options"] == {"token": "<redacted>"}
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "_job.json" for p in written) and any(p.suffix == ".parquet" for p in written)
    leaks = [str(p.relative_to(out)) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    status = run_cli("status", str(out), "--json")
    assert status.returncode == 0 and secret not in status.stdout
