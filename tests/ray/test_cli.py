"""`bulkgen run` and `bulkgen status` as real subprocesses, with their own local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, job_dict, write_job, write_prompts
from tests.ray.conftest import assert_exactly_once, assert_finished_layout

pytestmark = pytest.mark.ray


def _bulkgen(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _psutil():
    try:
        import psutil
    except ImportError:  # ray[default] bundles psutil in its thirdparty_files, put on sys.path by `import ray`
        import ray  # noqa: F401
        import psutil
    return psutil


def _processes_of(ray_tmp: str) -> list:
    """Live processes whose command line or environment points at `ray_tmp`: the Ray that run started."""
    psutil = _psutil()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if ray_tmp in " ".join(p.info["cmdline"] or ()) or p.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_run_then_status(tiny_model, tmp_path, request):
    psutil = _psutil()

    write_prompts(tmp_path / "in.parquet", 30)
    out_dir = tmp_path / "out"
    spec = job_dict(
        str(tmp_path / "in.parquet"),
        str(out_dir),
        tiny_model,
        generation={"max_new_tokens": 12},
        output={"include_prompt": True},
        resources={"replicas": 1, "batch_size": 8, "num_cpus": 1},
    )
    job = write_job(tmp_path / "job.yaml", spec)
    # Ray's files stay in tmp_path, but its unix socket paths must fit in 107 bytes,
    # which a pytest tmp_path plus Ray's session directory does not: Ray gets a short link.
    (tmp_path / "ray").mkdir()
    ray_tmp = Path(tempfile.gettempdir()) / f"bg-{uuid.uuid4().hex[:8]}"
    ray_tmp.symlink_to(tmp_path / "ray", target_is_directory=True)
    request.addfinalizer(ray_tmp.unlink)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    try:
        run = _bulkgen("run", str(job), "--set", "generation.max_new_tokens=6", "--no-progress", env=env)
        survivors = _processes_of(str(ray_tmp))
        # Ray waits briefly for its processes to exit on shutdown; give stragglers a grace that
        # holds on a loaded machine (wait_procs returns as soon as they are gone).
        _, survivors = psutil.wait_procs(survivors, timeout=60)
        assert not survivors, "Ray processes outlived `bulkgen run`: " + "; ".join(
            f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in survivors
        )
    finally:
        for p in _processes_of(str(ray_tmp)):
            p.kill()
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ray" / "ray").is_dir(), "the run did not start its Ray under RAY_TMPDIR"

    ids = [f"row-{i:05d}" for i in range(30)]
    out = assert_exactly_once(str(out_dir), {}, ids, n=1)
    assert_finished_layout(out, shards=3, rows_total=30)
    # --set reached the job: the recorded spec and every row say 6, not the file's 12.
    assert out.record["spec"]["generation"]["max_new_tokens"] == 6
    assert all(r["completion_tokens"] <= 6 for r in out.data)
    assert any(r["completion_tokens"] == 6 for r in out.data)

    assert "succeeded: 30 rows generated, 0 failed, in 3 shards" in run.stdout
    assert f"results:   {out_dir}/data/" in run.stdout
    shown = [r for r in out.data if textwrap.indent(f"{r['prompt']}\n  -> {r['text']}", "  ") in run.stdout]
    assert len(shown) == 3, run.stdout

    status = _bulkgen("status", str(out_dir), env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "state:    succeeded" in status.stdout
    assert "30/30 (100.0%)  done 30  failed 0" in status.stdout
    assert "3/3 committed" in status.stdout
    assert str(out_dir) in status.stdout

    missing = tmp_path / "never-ran"
    nothing = _bulkgen("status", str(missing), env=env, timeout=120)
    assert nothing.returncode == 2
    assert nothing.stdout == ""
    assert f"no job record (_job.json) under {missing}" in nothing.stderr
    assert "Traceback" not in nothing.stderr
