"""(c) bulkgen end to end: Parquet in, a local Ray started from this process, Parquet out.

Everything measured comes from the job record (`_job.json`) the driver writes:
its timestamps, and each replica's engine counters and busy times as the
replica's last shard result reported them (runs[-1]["replicas"])."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.baselines import Result
from bench.workloads import Workload

# A replica's cumulative engine counters in the record (summed over replicas) and its
# times (one per replica): model loaded, first engine step, engine last idle.
COUNTERS = ("forward_tokens", "padded_tokens", "prefill_positions", "steps")
TIMES = ("loaded_at", "first_step_at", "idle_at")


@dataclass(frozen=True)
class BulkgenConfig:
    replicas: int
    torch_threads: int
    batch_size: int
    max_batch_tokens: int
    rows_per_shard: int
    num_gpus: float = 0
    dtype: str = "float32"

    def label(self) -> str:
        return f"bulkgen {self.replicas}x{self.torch_threads}t b={self.batch_size}"


def start_ray(temp_dir: str, num_gpus: int) -> None:
    """ray.init on loopback (like tests/conftest.start_local_ray), its files under `temp_dir`."""
    import ray

    ray.init(
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        num_cpus=os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )


def _seconds(start: str, end: str) -> float:
    """Seconds between two of the record's ISO 8601 timestamps."""
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def engine_stats(run: dict, wl: Workload) -> dict:
    """The replicas' engine counters summed, and their times in seconds after the first
    replica was ready (sorted lists, one per replica): start spread and tail imbalance."""
    replicas = list(run.get("replicas", {}).values())
    stats: dict = {k: sum(r.get(k, 0) for r in replicas) for k in COUNTERS}
    stats["replicas"] = len(replicas)
    ready = run["first_replica_ready_at"]
    for key in TIMES:
        stats[key] = sorted(_seconds(ready, r[key]) for r in replicas if r.get(key))
    # forward_tokens counts each prompt once and each decode step's rows: what is left over
    # the prompts, per step, is how full the decode batches were.
    prompts = wl.num_return_sequences * sum(len(p) for p in wl.prompt_ids)
    if stats["steps"]:
        stats["mean_decode_batch"] = (stats["forward_tokens"] - prompts) / stats["steps"]
    return stats


def run_bulkgen(wl: Workload, model_dir: Path, work_dir: Path, cfg: BulkgenConfig) -> Result:
    """Run the workload as a bulkgen job on a Ray started (and shut down) here.

    Steady state: completion tokens / (job finished - first replica ready),
    what the driver records. End to end adds Ray start-up, validation and
    model loading: from just before ray.init to the job's end."""
    import ray

    from jobs.core.layout import RECORD
    from jobs.core.spec import spec_from_dict
    from jobs.core.times import now
    from jobs.driver import run_job

    name = f"{wl.name}-{cfg.replicas}x{cfg.torch_threads}"
    data = wl.write_parquet(work_dir / "input" / f"{wl.name}.parquet")
    output = work_dir / "bulkgen-output" / name
    shutil.rmtree(output, ignore_errors=True)
    num_cpus = max(1, (os.cpu_count() or 1) // cfg.replicas) if not cfg.num_gpus else 1
    spec = spec_from_dict(
        {
            "name": name,
            "input": {
                "uri": str(data),
                "prompt_column": "prompt",
                "id_column": "id",
                "max_new_tokens_column": "max_new_tokens",
            },
            "model": {"path": str(model_dir), "dtype": cfg.dtype},
            "generation": {
                "max_new_tokens": wl.max_new_tokens,
                "do_sample": wl.do_sample,
                "num_return_sequences": wl.num_return_sequences,
                "seed": 0,
            },
            "output": {"uri": str(output)},
            "resources": {
                "replicas": cfg.replicas,
                "num_cpus": num_cpus,
                "num_gpus": cfg.num_gpus,
                "torch_threads": cfg.torch_threads,
                "batch_size": cfg.batch_size,
                "max_batch_tokens": cfg.max_batch_tokens,
            },
            "shards": {"rows_per_shard": cfg.rows_per_shard},
        }
    )
    # Short: Ray's Unix socket paths live under it.
    ray_dir = tempfile.mkdtemp(prefix="bgb-ray-", dir="/tmp")
    started = now()
    try:
        start_ray(ray_dir, num_gpus=int(cfg.num_gpus and 1) * cfg.replicas)
        run_job(spec, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    record = json.loads((output / RECORD).read_text())  # what the driver left: the job's record
    run = record["runs"][-1]
    c = record["counts"]
    if c["rows_failed"]:
        raise RuntimeError(f"bulkgen job {name}: {c['rows_failed']} rows failed; see {output}/errors")
    stats = engine_stats(run, wl)
    return Result(
        cfg.label(),
        wl.name,
        c["completion_tokens"],
        _seconds(run["first_replica_ready_at"], run["finished_at"]),
        stats["padded_tokens"] or None,
        stats["forward_tokens"] or None,
        end_to_end_seconds=_seconds(started, run["finished_at"]),
        extra={"engine": stats, "config": cfg},
    )
