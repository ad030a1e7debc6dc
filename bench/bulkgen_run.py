"""(c) bulkgen end to end: Parquet in, a local Ray started from this process, Parquet out."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import hooks
from bench.baselines import Result
from bench.workloads import Workload

REPO = Path(__file__).resolve().parent.parent


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


def start_ray(temp_dir: str, stats_dir: str, num_gpus: int) -> None:
    """ray.init on loopback (like tests/conftest.start_local_ray), its files under `temp_dir`,
    with the stats hook in every worker."""
    import ray

    ray.init(
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        num_cpus=os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": hooks.SETUP_HOOK,
            # PYTHONPATH: the hook is imported before Ray adds the driver's paths.
            "env_vars": {
                hooks.STATS_DIR_ENV: stats_dir,
                "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false",
            },
        },
    )


def run_bulkgen(wl: Workload, model_dir: Path, work_dir: Path, cfg: BulkgenConfig) -> Result:
    """Run the workload as a bulkgen job on a Ray started (and shut down) here.

    Steady state: completion tokens / (job finished - first replica ready),
    what the driver records. End to end adds Ray start-up, validation and
    model loading: from just before ray.init to the job's end."""
    import ray

    from jobs.driver import run_job
    from jobs.spec import spec_from_dict

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
    stats_dir = tempfile.mkdtemp(prefix="stats-", dir=work_dir)
    # Short: Ray's Unix socket paths live under it.
    ray_dir = tempfile.mkdtemp(prefix="bgb-ray-", dir="/tmp")
    started = time.time()
    try:
        start_ray(ray_dir, stats_dir, num_gpus=int(cfg.num_gpus and 1) * cfg.replicas)
        record = run_job(spec, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    run = record.runs[-1]
    c = record.counts
    if c.rows_failed:
        raise RuntimeError(f"bulkgen job {name}: {c.rows_failed} rows failed; see {output}/errors")
    stats = hooks.read_stats(stats_dir)
    shutil.rmtree(stats_dir, ignore_errors=True)
    # Engine timestamps relative to the first replica being ready: start spread and tail imbalance.
    ready = run["first_replica_ready_at"]
    for key in ("created_at", "first_step_at", "idle_at"):
        stats[key] = sorted(t - ready for t in stats.get(key, []))
    # forward_tokens counts each prompt once and each decode step's rows: what is left over
    # the prompts, per step, is how full the decode batches were.
    prompts = wl.num_return_sequences * sum(len(p) for p in wl.prompt_ids)
    if stats.get("steps"):
        stats["mean_decode_batch"] = (stats["forward_tokens"] - prompts) / stats["steps"]
    return Result(
        cfg.label(),
        wl.name,
        c.completion_tokens,
        run["finished_at"] - run["first_replica_ready_at"],
        stats.get("padded_tokens"),
        stats.get("forward_tokens"),
        end_to_end_seconds=run["finished_at"] - started,
        extra={"engine": stats, "config": cfg},
    )

