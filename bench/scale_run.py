"""The scale row (issue 20): a real `run_job` on a local Ray over 20,000 and 200,000 short prompts.

    python -m bench.driver_scale --run DIR [--smoke] [--rows 20000,200000]

Each size runs in a fresh process, the job's driver, which starts Ray as the bench
does (bench.bulkgen_run.start_ray), runs the job on the transformers engine with the
demo model (examples/demo/model; --smoke: the bench's smoke model) and samples its
own RSS every 0.5 s on a thread. Prompts are 8-32 tokens (4,096 different ones,
cycled; ids unique), 4 new tokens, greedy, the spec's defaults for everything else.
Per size: wall time of run_job, the driver's peak RSS, and time per 1,000 rows over
the first and the last 10% of shards by commit time (commit records' committed_at).
Beside them the plain loop (static batches in a process of its own) on the smallest
size: its time per 1,000 rows does not depend on how many rows follow.
Target: time per 1,000 rows and driver peak RSS flat within 10% from the smallest
size to the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "examples" / "demo" / "model"
SIZES = (20_000, 200_000)
SMOKE_SIZES = (1_000, 4_000)
NEW_TOKENS = 4
DISTINCT_PROMPTS = 4_096
PLAIN_LOOP_BATCHES = (32, 128)
MIN_WINDOW = 4  # shards in each of the first and last windows, at least
TIMEOUT_S = 3600  # one size's driver process (200,000 rows took about 150 s)


def write_input(path: Path, tokenizer, rows: int, seed: int = 6) -> Path:
    """`rows` prompts of 8-32 tokens (a few thousand different ones, cycled) with unique ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.workloads import make_prompts

    rng = random.Random(seed)
    texts, _ = make_prompts(tokenizer, [rng.randint(8, 32) for _ in range(min(rows, DISTINCT_PROMPTS))], seed)
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "prompt": [texts[i % len(texts)] for i in range(rows)]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=10_000)
    return path


class RssSampler:
    """This process's resident set size, sampled every `period` seconds on a thread: the peak."""

    def __init__(self, period: float = 0.5):
        self.period, self.peak_kib = period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, _rss_kib())
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _rss_kib())


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def per_thousand_rows(output: Path) -> dict:
    """Time per 1,000 rows over the first and the last 10% of shards (by commit time; at least
    MIN_WINDOW shards each) and from the first commit to the last, and p50/p95 of a shard's time
    on its replica, from the commit records."""
    from datetime import datetime

    from jobs.core.layout import COMMITS
    from jobs.core.protocol import CommitRecord

    commits = [CommitRecord.from_json(json.loads(p.read_text())) for p in (output / COMMITS).glob("*.json")]
    commits.sort(key=lambda c: c.committed_at)
    at = [datetime.fromisoformat(c.committed_at).timestamp() for c in commits]
    # At least MIN_WINDOW shards a window: replicas commit in bursts, and on 20 shards a tenth is two.
    k = min(max(len(commits) // 10, MIN_WINDOW), len(commits) // 2)

    def window(lo: int, hi: int) -> float:  # seconds per 1,000 rows of commits lo+1..hi
        rows = sum(c.input_rows for c in commits[lo + 1 : hi + 1])
        return 1000 * (at[hi] - at[lo]) / rows if rows else float("nan")

    seconds = sorted(c.seconds for c in commits if c.seconds is not None)
    return {
        "shards": len(commits),
        "per_1k_first_s": window(0, k),
        "per_1k_last_s": window(len(commits) - 1 - k, len(commits) - 1),
        "per_1k_steady_s": window(0, len(commits) - 1),  # first commit to last: start-up and tail left out
        "shard_s_p50": statistics.median(seconds) if seconds else None,
        "shard_s_p95": seconds[int(0.95 * (len(seconds) - 1))] if seconds else None,
    }


def measure(data: Path, model_dir: Path, output: Path) -> dict:
    """In this process (the driver): Ray, run_job, the RSS sampler; what the row reports."""
    from bench.bulkgen_run import local_ray
    from jobs.core.spec import spec_from_dict
    from jobs.driver import run_job

    spec = spec_from_dict(
        {
            "name": output.name,
            "input": {"uri": str(data), "prompt_column": "prompt", "id_column": "id"},
            "model": {"path": str(model_dir), "dtype": "float32", "engine": "transformers"},
            "generation": {"max_new_tokens": NEW_TOKENS, "do_sample": False, "seed": 0},
            "output": {"uri": str(output)},
        }
    )
    rss_before = _rss_kib()
    with RssSampler() as rss:
        started, cpu_before = time.perf_counter(), os.times()
        with local_ray(num_gpus=0, prefix="bgr-"):
            record = run_job(spec, progress=False)
            wall, cpu_after = time.perf_counter() - started, os.times()
    return {
        "rows": record.counts.rows_total,
        "wall_s": wall,
        "completion_tokens": record.counts.completion_tokens,
        "driver_peak_rss_mib": rss.peak_kib / 1024,
        "driver_rss_before_mib": rss_before / 1024,
        # The driver's own CPU (every thread; not Ray's processes): on 2 cores it is taken from the replicas.
        "driver_cpu_s": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
        **per_thousand_rows(output),
    }


def run(where: Path, smoke: bool = False, sizes: tuple[int, ...] | None = None, say=print) -> dict:
    """Every size in a fresh driver process, then the plain loop on the smallest."""
    import pyarrow.parquet as pq

    from bench.baselines import static_batches_process
    from bench.model import load_model
    from bench.presets import CPU, smoke as smoke_preset
    from bench.run import calibrate_threads, prepare_model

    sizes = sizes or (SMOKE_SIZES if smoke else SIZES)
    preset = smoke_preset(CPU) if smoke else CPU  # the demo model's vocabulary is the CPU preset's
    model_dir = prepare_model(preset, where) if smoke else DEMO_MODEL
    model, tokenizer = load_model(model_dir)
    # The loop's threads as the bench's (b) get them: all cores or one, whichever runs faster now.
    threads, _ = calibrate_threads(model, tokenizer, preset, 16, lambda: None)
    del model
    runs = {}
    for rows in sizes:
        data = write_input(where / "input" / f"rows-{rows}.parquet", tokenizer, rows)
        output = where / "output" / f"scale-{rows}"
        shutil.rmtree(output, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.scale_run", "--measure", str(data), str(model_dir), str(output)],
            capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"scale run of {rows:,} rows failed: {proc.stderr.strip()[-500:]}")
        runs[rows] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[rows]
        say(f"   {rows:>9,} rows: {r['wall_s']:.1f}s wall, {r['shards']} shards, per 1,000 rows "
            f"{r['per_1k_first_s']:.2f}s (first 10%) / {r['per_1k_last_s']:.2f}s (last 10%) / "
            f"{r['per_1k_steady_s']:.2f}s (first commit to last), driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB, "
            f"driver CPU {r['driver_cpu_s']:.1f}s")  # fmt: skip
    smallest = min(sizes)
    texts = pq.read_table(where / "input" / f"rows-{smallest}.parquet", columns=["prompt"]).column(0).to_pylist()
    loops = [
        static_batches_process(model_dir, texts, NEW_TOKENS, b, where, threads, workload="scale")
        for b in PLAIN_LOOP_BATCHES
    ]
    best = min(loops, key=lambda r: r.end_to_end_seconds)
    say(f"   plain loop on {smallest:,} rows, {threads} torch thread(s): " + ", ".join(
        f"b={b} {r.end_to_end_seconds:.1f}s ({r.seconds:.1f}s generating)" for b, r in zip(PLAIN_LOOP_BATCHES, loops)
    ))  # fmt: skip
    return {
        "model": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
        "new_tokens": NEW_TOKENS,
        "runs": runs,
        "plain_loop": {
            "rows": smallest,
            "batch_size": PLAIN_LOOP_BATCHES[loops.index(best)],
            "threads": threads,
            "wall_s": best.end_to_end_seconds,
            "generate_s": best.seconds,
            "per_1k_s": 1000 * best.seconds / smallest,
        },
    }


def flatness(scale: dict) -> dict[str, float]:
    """Largest size against smallest, as ratios: time per 1,000 rows from the first commit to the
    last and over the last 10% of shards (a window of a few commits, the noisier), and driver peak RSS."""
    runs = scale["runs"]
    lo, hi = runs[min(runs)], runs[max(runs)]
    return {
        "per_1k_steady": hi["per_1k_steady_s"] / lo["per_1k_steady_s"],
        "per_1k_last": hi["per_1k_last_s"] / lo["per_1k_last_s"],
        "peak_rss": hi["driver_peak_rss_mib"] / lo["driver_peak_rss_mib"],
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--measure"]:
        data, model_dir, output = (Path(a) for a in argv[1:4])
        print(json.dumps(measure(data, model_dir, output)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.driver_scale --run", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="scratch directory (inputs, outputs)")
    parser.add_argument("--smoke", action="store_true", help=f"the smoke model, {SMOKE_SIZES} rows")
    parser.add_argument("--rows", help="comma-separated sizes (default 20000,200000)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = tuple(int(n) for n in args.rows.split(",")) if args.rows else None
    scale = run(args.dir, args.smoke, sizes, say=lambda m: print(m, flush=True))
    print(json.dumps({**scale, "flat": flatness(scale)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
