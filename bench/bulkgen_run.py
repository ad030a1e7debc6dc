"""(c) bulkgen end to end: Parquet in, a local Ray started from this process, Parquet out.

Everything measured comes from the job record (`_job.json`) the driver writes:
its timestamps, and each replica's engine counters and busy times as the
replica's last shard result reported them (runs[-1]["replicas"])."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.baselines import Result
from bench.workloads import Workload
from jobs.core.times import seconds_between

# A replica's times in the record (one per replica): model loaded, first engine step,
# engine last idle. Every other number a replica reports is a cumulative engine counter,
# summed over replicas; which ones depends on the engine (transformers: forward_tokens,
# padded_tokens, prefill_positions, steps; vllm: steps, prompt_tokens, generated_tokens).
TIMES = ("loaded_at", "first_step_at", "idle_at")


@dataclass(frozen=True)
class BulkgenConfig:
    replicas: int | None
    torch_threads: int | None
    batch_size: int | None
    max_batch_tokens: int | None
    rows_per_shard: int | None
    num_gpus: float = 0
    dtype: str = "float32"
    engine: str = "transformers"  # model.engine: transformers | vllm | auto
    engine_options: dict = field(default_factory=dict)  # model.engine_options (vLLM's EngineArgs)
    group_by_prefix: str | None = None  # shards.group_by_prefix (off | on); None: the spec's default
    # The spec's defaults: only input, model path, generation and output are set; after the
    # run the fields above say what the defaults came to (from the job's record).
    defaults: bool = False

    @classmethod
    def spec_defaults(cls) -> BulkgenConfig:
        return cls(None, None, None, None, None, engine="auto", defaults=True)

    def label(self) -> str:
        if self.defaults:
            return "bulkgen (spec defaults)"
        grouped = f", group_by_prefix {self.group_by_prefix}" if self.group_by_prefix else ""
        return f"bulkgen[{self.engine}] {self.replicas}x{self.torch_threads}t b={self.batch_size}{grouped}"


def start_ray(temp_dir: str, num_gpus: int) -> None:
    """ray.init on loopback (like tests/conftest.start_local_ray), its files under `temp_dir`.

    Its workers run at nice 0, as the baselines in this process do (Ray's default is 15),
    and take TOKENIZERS_PARALLELISM from this process's environment rather than from a
    runtime_env, so replicas start on the workers Ray prestarts, as `bulkgen run`'s do."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet ray.init starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        num_cpus=os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )


@contextmanager
def local_ray(num_gpus: int, prefix: str = "bgb-ray-") -> Iterator[None]:
    """start_ray in a fresh temp dir (short: Ray's Unix socket paths live under it); on the way
    out, ray.shutdown and the dir removed, whatever the body raised."""
    import ray

    ray_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        start_ray(ray_dir, num_gpus=num_gpus)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def finished_record(output: Path, name: str) -> tuple[dict, dict, dict]:
    """A finished job's record (`_job.json`), its last run and its counts; RuntimeError if a row failed."""
    from jobs.core.layout import RECORD

    record = json.loads((output / RECORD).read_text())
    run, counts = record["runs"][-1], record["counts"]
    if counts["rows_failed"]:
        raise RuntimeError(f"bulkgen job {name}: {counts['rows_failed']} rows failed; see {output}/errors")
    return record, run, counts


def engine_stats(run: dict, wl: Workload) -> dict:
    """The replicas' engine counters summed (whichever their engine keeps), and their times
    in seconds after the first replica was ready (sorted lists, one per replica): start
    spread and tail imbalance."""
    replicas = list(run.get("replicas", {}).values())
    stats: dict = {}
    for r in replicas:
        for k, v in r.items():
            if k not in TIMES and k != "pid" and isinstance(v, (int, float)) and not isinstance(v, bool):
                stats[k] = stats.get(k, 0) + v
    stats["replicas"] = len(replicas)
    ready = run["first_replica_ready_at"]
    for key in TIMES:
        stats[key] = sorted(seconds_between(ready, r[key]) for r in replicas if r.get(key))
    steps = stats.get("steps")
    if steps and "forward_tokens" in stats:
        # transformers: forward_tokens counts each prompt once and each decode step's rows:
        # what is left over the prompts, per step, is how full the decode batches were.
        prompts = wl.num_return_sequences * sum(len(p) for p in wl.prompt_ids)
        stats["mean_decode_batch"] = (stats["forward_tokens"] - prompts) / steps
    elif steps and "generated_tokens" in stats:
        # vllm: a step gives every running sequence one new token (a prompt's last chunk too).
        stats["mean_decode_batch"] = stats["generated_tokens"] / steps
    return stats


def output_texts(output: Path) -> dict:
    """(id, sample_index) -> text of every generated row in a finished job's output."""
    import pyarrow.parquet as pq

    from jobs.core.layout import DATA

    texts = {}
    for f in sorted((output / DATA).glob("*.parquet")):
        t = pq.read_table(f, columns=["id", "sample_index", "text"])
        for i, s, text in zip(*(t.column(c).to_pylist() for c in ("id", "sample_index", "text"))):
            texts[(i, s)] = text
    return texts


def run_bulkgen(wl: Workload, model_dir: Path, work_dir: Path, cfg: BulkgenConfig) -> Result:
    """Run the workload as a bulkgen job on a Ray started (and shut down) here.

    Steady state: completion tokens / (job finished - first replica ready),
    what the driver records (extra["all_ready_s"]: from the last replica
    ready). End to end adds Ray start-up, validation and
    model loading: from just before ray.init to the job's end."""
    from jobs.core.spec import spec_from_dict
    from jobs.core.times import now
    from jobs.driver import run_job

    name = f"{wl.name}-defaults" if cfg.defaults else f"{wl.name}-{cfg.engine}-{cfg.replicas}x{cfg.torch_threads}"
    if cfg.group_by_prefix:
        name += f"-grouped-{cfg.group_by_prefix}"
    data = wl.write_parquet(work_dir / "input" / f"{wl.name}-{wl.rows}.parquet")
    output = work_dir / "bulkgen-output" / name
    shutil.rmtree(output, ignore_errors=True)
    num_cpus = max(1, (os.cpu_count() or 1) // (cfg.replicas or 1)) if not cfg.num_gpus else 1
    spec_data = {
        "name": name,
        "input": {
            "uri": str(data),
            "prompt_column": "prompt",
            "id_column": "id",
            "max_new_tokens_column": "max_new_tokens",
        },
        "model": {
            "path": str(model_dir),
            "dtype": cfg.dtype,
            "engine": cfg.engine,
            "engine_options": dict(cfg.engine_options),
        },
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
    if cfg.group_by_prefix:
        spec_data["shards"]["group_by_prefix"] = cfg.group_by_prefix
    if cfg.defaults:
        del spec_data["resources"], spec_data["shards"]
        spec_data["model"] = {"path": str(model_dir)}
    spec = spec_from_dict(spec_data)
    started = now()
    with local_ray(num_gpus=int(cfg.num_gpus and 1) * (cfg.replicas or 1)):
        run_job(spec, progress=False)
    record, run, c = finished_record(output, name)  # what the driver left: the job's record
    if cfg.defaults:  # what the defaults came to
        from jobs.core.plan import rows_per_shard

        res = spec.resources
        cfg = dataclasses.replace(
            cfg,
            replicas=run["replica_plan"]["launched"],
            torch_threads=res.torch_threads or int(res.num_cpus),
            batch_size=res.batch_size,
            rows_per_shard=rows_per_shard(spec.shards.rows_per_shard, wl.rows),
        )
    stats = engine_stats(run, wl)
    replica = record["model"].get("replica", {})  # the first replica's describe(): the engine it runs
    engine = replica.get("engine", "?")
    return Result(
        cfg.label().replace("[auto]", f"[auto={engine}]"),
        wl.name,
        c["completion_tokens"],
        seconds_between(run["first_replica_ready_at"], run["finished_at"]),
        stats.get("padded_tokens") or None,  # transformers only; vLLM's batches are ragged
        stats.get("forward_tokens") or None,
        end_to_end_seconds=seconds_between(started, run["finished_at"]),
        extra={
            "engine": stats,
            "config": cfg,
            "engine_name": engine,
            "engine_version": replica.get("engine_version", "?"),
            "startup_s": seconds_between(started, run["first_replica_ready_at"]),
            # Steady state from the last replica ready (the targets use the first: issue 20 keeps it);
            # on a layout whose replicas start seconds apart the two differ by start-up, not decoding.
            "all_ready_s": seconds_between(run["all_replicas_ready_at"], run["finished_at"])
            if run.get("all_replicas_ready_at")
            else None,
            "texts": output_texts(output),
        },
    )
