"""Driver scale: planning 10 million rows, and running 200,000 (issue 20's scale row).

    python -m bench.driver_scale DIR          # plan 10M rows in 1,000 Parquet files, in a fresh process
    python -m bench.driver_scale --run DIR    # run 20,000 and 200,000 rows end to end (bench.scale_run)

The planning check's files are real Parquet (10,000 rows each of `id` int64 and
a short `prompt`), so the footers carry real row counts. The measurement runs in
its own process so the peak-RSS high-water mark belongs to listing, footer
reading and planning alone, not to writing the files or to a loaded model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

FILES = 1_000
ROWS_PER_FILE = 10_000
ROWS_PER_SHARD = 1_000  # the spec's default


def write_files(where: Path, files: int = FILES, rows: int = ROWS_PER_FILE) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    where.mkdir(parents=True, exist_ok=True)
    prompts = pa.array(["p"] * rows).dictionary_encode()
    for i in range(files):
        path = where / f"part-{i:05d}.parquet"
        if path.exists():
            continue
        ids = pa.array(range(i * rows, (i + 1) * rows), pa.int64())
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return time.perf_counter() - started


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(where: Path) -> dict:
    """In this process: open_dataset + plan, wall time and memory.

    Peak RSS increase: the kernel's high-water mark (VmHWM, reset just before)
    minus the RSS before, libraries already imported; falls back to
    getrusage's lifetime peak where the mark cannot be reset. The Python-heap
    peak comes from a second pass under tracemalloc (which slows what it traces)."""
    import resource
    import tracemalloc

    from jobs.core.plan import plan
    from jobs.core.spec import InputSpec
    from jobs.dataset import open_dataset

    spec = InputSpec(uri=str(where), prompt_column="prompt")
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    lifetime_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    dataset = open_dataset(spec)
    opened = time.perf_counter()
    shards = plan(dataset.files, ROWS_PER_SHARD)
    done = time.perf_counter()
    if reset:
        peak_increase = _status_kib("VmHWM") - rss_before
    else:
        peak_increase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - lifetime_before
    result = {
        "files": len(dataset.files),
        "rows": dataset.num_rows,
        "shards": len(shards),
        "rows_per_shard": ROWS_PER_SHARD,
        "open_dataset_s": opened - started,
        "plan_s": done - opened,
        "wall_s": done - started,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_increase_mib": peak_increase / 1024,
    }
    del dataset, shards
    tracemalloc.start()
    plan(open_dataset(spec).files, ROWS_PER_SHARD)
    result["python_heap_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result


def run(where: Path) -> dict:
    """Write the files (if missing), then measure in a fresh interpreter."""
    write_s = write_files(where)
    out = subprocess.run(
        [sys.executable, "-m", "bench.driver_scale", "--measure", str(where)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["write_s"] = write_s
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        from bench.scale_run import main

        sys.exit(main(sys.argv[2:]))
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
    elif len(sys.argv) == 2:
        print(json.dumps(run(Path(sys.argv[1])), indent=2))
    else:
        sys.exit("usage: python -m bench.driver_scale DIR | --run DIR [--smoke] [--rows N,N]")
