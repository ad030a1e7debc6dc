"""The small job (issue 20): 768 prompts of 8-200 tokens, 48 new tokens, greedy, end to end.

Both sides pay their start-up, as a user who runs one job does:
- bulkgen: `bulkgen run` (`python -m jobs.cli run`) as a subprocess, a fresh interpreter
  that starts its own local Ray; the spec sets input, model, generation, output and
  `model.engine` only (the spec's defaults for the rest). Wall time from the
  subprocess's start to its exit; the record's timeline says where it went.
- the plain loop: a fresh interpreter that imports torch and transformers, loads the
  model, tokenizes, sorts, and generates static batches (bench.baselines
  static_batches_process); each batch size in the preset, the best is the baseline.
- vLLM offline with start-up (bench.vllm_offline: from its process's start to the end
  of its generate call).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.baselines import Result
from bench.bulkgen_run import engine_stats, finished_record
from bench.timeline import timeline_seconds
from bench.workloads import Workload
from jobs.core.times import seconds_between

REPO = Path(__file__).resolve().parent.parent


def timeline(run: dict) -> dict[str, float]:
    """The record's start-up timeline (runs[-1].timeline, where the driver keeps one) as
    seconds after the process started; empty for a record without one."""
    stamps = run.get("timeline") or {}
    return dict(timeline_seconds(stamps)) if "process_started" in stamps else {}


def bulkgen_env(ray_tmp: str) -> dict[str, str]:
    """The subprocess's environment: this checkout first on the path, a Ray of its own under
    `ray_tmp` (no other local Ray is joined), workers at the baselines' niceness (Ray's
    default is 15, the plain loop runs at 0: plan A5), tokenizers single-threaded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_TMPDIR=ray_tmp, RAY_worker_niceness="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """The exit status; past `timeout`, SIGTERM first (bulkgen cancels the job and stops the Ray
    it started), SIGKILL if that does not end it within a minute, and TimeoutExpired."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_bulkgen_process(
    wl: Workload, model_dir: Path, work_dir: Path, engine: str, resources: dict | None = None, timeout: float = 1800
) -> Result:  # fmt: skip
    """`bulkgen run` on the workload in a subprocess; raises RuntimeError if it fails."""
    layout = "-".join(f"{k}{v}" for k, v in sorted((resources or {}).items()))
    name = f"{wl.name}-{engine}" + (f"-{layout}" if layout else "")
    data = wl.write_parquet(work_dir / "input" / f"{wl.name}.parquet")
    output = work_dir / "bulkgen-output" / name
    shutil.rmtree(output, ignore_errors=True)
    spec = {
        "name": name,
        "input": {"uri": str(data), "prompt_column": "prompt", "id_column": "id"},
        "model": {"path": str(model_dir), "dtype": "float32", "engine": engine},
        "generation": {"max_new_tokens": wl.max_new_tokens, "do_sample": False, "seed": 0},
        "output": {"uri": str(output)},
    }
    if resources:
        spec["resources"] = resources
    spec_path = work_dir / "specs" / f"{name}.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    ray_tmp = tempfile.mkdtemp(prefix="bgs-", dir="/tmp")  # short: Ray's socket paths live under it
    log = work_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "run", str(spec_path), "--overwrite", "--no-progress"],
                env=bulkgen_env(ray_tmp), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
            code = _wait(proc, timeout)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"bulkgen run exited {code}: " + " / ".join(tail))
    record, run, counts = finished_record(output, name)
    ran = record["model"].get("replica", {}).get("engine", "?")
    label = f"bulkgen run [{engine}={ran}]" if engine == "auto" else f"bulkgen run [{engine}]"
    if resources:
        label += f" {resources['replicas']}x{resources['torch_threads']}t"
    else:
        label += f" {run.get('replica_plan', {}).get('launched', '?')} replica(s), spec defaults"
    return Result(
        label + " (own process)",
        wl.name,
        counts["completion_tokens"],
        seconds_between(run["first_replica_ready_at"], run["finished_at"]),
        end_to_end_seconds=wall,
        extra={
            "engine": engine_stats(run, wl),
            "engine_name": ran,
            "timeline": timeline(run),
            "resources": resources or {},
        },
    )


def run_small(
    wl: Workload, model_dir: Path, work_dir: Path, batch_sizes: tuple[int, ...], threads: int, vllm, tokenizer,
    eos: set[int], vllm_usable: bool, record, failed,
) -> None:  # fmt: skip
    """Every system of the small job, each through `record` (or `failed`). `threads`: the plain
    loop's torch threads; `vllm`: the VllmSettings of vLLM offline (None: it does not run).

    bulkgen runs with model.engine transformers, auto (vLLM where it is installed and runs
    the model: then the row with vLLM, as a user gets it) and, where auto ran vLLM, vLLM on
    one replica with every core (resources.replicas 1): which layout starts and runs the
    small job faster (plan A6)."""
    from bench.baselines import static_batches_process
    from bench.vllm_offline import run_vllm_offline

    for b in batch_sizes:
        try:
            record(static_batches_process(model_dir, list(wl.texts), wl.max_new_tokens, b, work_dir, threads))
        except Exception as e:
            failed(f"plain loop b={b}", e)
    if vllm is not None:
        try:
            r = record(run_vllm_offline(wl, model_dir, work_dir, vllm, tokenizer, eos))
            r.notes = f"{r.extra['vllm']['startup_s']:.1f} s to start (import, LLM(), a one-token warm-up)"
        except Exception as e:
            failed(vllm.label(), e)
    cores = os.cpu_count() or 1
    runs: list[tuple[str, dict | None]] = [("transformers", None), ("auto", None)]
    if vllm_usable and cores > 1:
        runs.append(("vllm", {"replicas": 1, "torch_threads": cores}))
    for engine, resources in runs:
        try:
            r = record(run_bulkgen_process(wl, model_dir, work_dir, engine, resources))
        except Exception as e:
            failed(f"bulkgen run [{engine}]", e)
            continue
        if r.extra["timeline"]:
            r.notes = "timeline (s after the process started): " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(r.extra["timeline"].items(), key=lambda kv: kv[1])
            )
