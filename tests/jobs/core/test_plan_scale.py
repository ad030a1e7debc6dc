"""The driver plans 10 million rows over 1,000 files from footers, in bounded memory."""

import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.dataset import open_dataset
from jobs.core.plan import plan
from jobs.core.spec import InputSpec

FILES, ROWS_PER_FILE, ROWS_PER_SHARD = 1_000, 10_000, 1_000


def test_plans_ten_million_rows_over_a_thousand_files(tmp_path):
    # One small column is enough: only footers are read. Row groups of 2,500
    # rows so shards cut across them.
    table = pa.table({"prompt": pa.array(["p"] * ROWS_PER_FILE)})
    for i in range(FILES):
        sub = tmp_path / f"day={i % 7}"
        sub.mkdir(exist_ok=True)
        pq.write_table(table, sub / f"part-{i:04d}.parquet", row_group_size=2_500)

    tracemalloc.start()
    started = time.perf_counter()
    dataset = open_dataset(InputSpec(uri=str(tmp_path), prompt_column="prompt"))
    shards = plan(dataset.files, ROWS_PER_SHARD)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert dataset.num_rows == FILES * ROWS_PER_FILE == 10_000_000
    assert len(shards) == FILES * ROWS_PER_FILE // ROWS_PER_SHARD
    assert [s.index for s in shards] == list(range(len(shards)))
    assert sum(s.num_rows for s in shards) == dataset.num_rows
    # Shards tile each file exactly once, in relpath order.
    assert [s.relpath for s in shards] == sorted(s.relpath for s in shards)
    by_file: dict[str, list] = {}
    for s in shards:
        by_file.setdefault(s.relpath, []).append((s.start, s.stop))
    assert len(by_file) == FILES
    assert all(ranges == [(k, k + ROWS_PER_SHARD) for k in range(0, ROWS_PER_FILE, ROWS_PER_SHARD)] for ranges in by_file.values())
    # Memory follows files and shards, not rows: a few KB per file.
    assert peak < 64 * 2**20, f"planning peaked at {peak / 2**20:.1f} MiB"
    print(f"planned {dataset.num_rows:,} rows / {FILES} files in {seconds:.2f}s, traced peak {peak / 2**20:.1f} MiB")
