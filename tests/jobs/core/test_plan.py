"""Planning is pure and deterministic, and the driver plans from Parquet footers alone."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener

from jobs.dataset import check_unique_ids, open_dataset
from jobs.core.plan import InputFile, Shard, plan, shard_name
from jobs.core.spec import spec_from_dict
from tests.conftest import REPO, job_dict


def files(*sizes: int, prefix: str = "part") -> list[InputFile]:
    return [InputFile(f"s3://b/{prefix}-{i:03d}.parquet", f"{prefix}-{i:03d}.parquet", n) for i, n in enumerate(sizes)]


def check_cover(shards: list[Shard], inputs: list[InputFile], rows_per_shard: int) -> None:
    """Shards cover every row of every file exactly once, in order, never spanning files."""
    assert [s.index for s in shards] == list(range(len(shards)))
    for f in inputs:
        mine = [s for s in shards if s.relpath == f.relpath]
        assert all(s.url == f.url for s in mine)
        assert [(s.start, s.stop) for s in mine] == [
            (start, min(start + rows_per_shard, f.num_rows)) for start in range(0, f.num_rows, rows_per_shard)
        ]
    assert all(0 < s.num_rows <= rows_per_shard for s in shards)
    assert sum(s.num_rows for s in shards) == sum(f.num_rows for f in inputs)


# -- pure planning ---------------------------------------------------------------------


def test_shards_respect_rows_per_shard_and_never_span_files():
    inputs = files(10, 3, 7, 25)
    shards = plan(inputs, 4)
    check_cover(shards, inputs, 4)
    assert [(s.relpath, s.start, s.stop) for s in shards[:5]] == [
        ("part-000.parquet", 0, 4),
        ("part-000.parquet", 4, 8),
        ("part-000.parquet", 8, 10),  # the file's tail is its own shard, not topped up from the next file
        ("part-001.parquet", 0, 3),
        ("part-002.parquet", 0, 4),
    ]
    assert len(shards) == 3 + 1 + 2 + 7


@pytest.mark.parametrize("rows_per_shard", [1, 2, 5, 10, 11, 1000])
def test_every_row_is_in_exactly_one_shard(rows_per_shard):
    inputs = files(10, 1, 0, 13, 5)
    check_cover(plan(inputs, rows_per_shard), inputs, rows_per_shard)


def test_sorted_by_relpath_regardless_of_input_order():
    inputs = files(5, 8, 2, 9, 4, 1)
    expected = plan(inputs, 3)
    rng = random.Random(7)
    for _ in range(20):
        shuffled = inputs[:]
        rng.shuffle(shuffled)
        assert plan(shuffled, 3) == expected
    relpaths = [s.relpath for s in expected]
    assert relpaths == sorted(relpaths)


def test_nested_relpaths_sort_as_strings():
    inputs = [
        InputFile("file:///d/b/x.parquet", "b/x.parquet", 2),
        InputFile("file:///d/a.parquet", "a.parquet", 2),
        InputFile("file:///d/a/z.parquet", "a/z.parquet", 2),
    ]
    assert [s.relpath for s in plan(inputs, 5)] == ["a.parquet", "a/z.parquet", "b/x.parquet"]


def test_empty_files_give_no_shards():
    assert plan(files(0, 0), 10) == []
    assert plan([], 10) == []
    shards = plan(files(0, 3, 0, 2), 10)
    assert [(s.index, s.relpath, s.start, s.stop) for s in shards] == [
        (0, "part-001.parquet", 0, 3),
        (1, "part-003.parquet", 0, 2),
    ]


def test_plan_is_deterministic_and_does_not_mutate_input():
    inputs = files(9, 4, 6)
    snapshot = list(inputs)
    first = plan(inputs, 4)
    assert plan(inputs, 4) == first
    assert inputs == snapshot
    # Any iterable will do, including a one-shot generator.
    assert plan((f for f in inputs), 4) == first


def test_shard_names_are_deterministic():
    shards = plan(files(3, 3), 2)
    assert [s.name for s in shards] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert shard_name(12345) == "part-12345"
    assert shards[1].num_rows == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_rows_per_shard_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"rows_per_shard must be >= 1, got {bad}"):
        plan(files(3), bad)


def test_plan_module_imports_neither_ray_nor_torch():
    code = (
        "import sys, jobs.core.plan; "
        "heavy = [m for m in ('ray', 'torch', 'transformers', 'fsspec', 'pyarrow') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the driver never loads the dataset --------------------------------------------------


@pytest.fixture
def no_row_reads(monkeypatch):
    """Make every pyarrow way of reading Parquet rows raise; footers stay readable."""
    calls: list[str] = []

    def forbid(name):
        def raiser(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the driver read rows through {name}")

        return raiser

    for method in ("read", "read_row_group", "read_row_groups", "iter_batches", "scan_contents"):
        monkeypatch.setattr(pq.ParquetFile, method, forbid(f"ParquetFile.{method}"))
    for function in ("read_table", "read_pandas"):
        monkeypatch.setattr(pq, function, forbid(f"pq.{function}"))
    return calls


def input_spec(root, tmp_path, **input_fields):
    data = job_dict(str(root), str(tmp_path / "out"), tmp_path / "m", input={"pass_through": [], **input_fields})
    return spec_from_dict(data).input


def write_many(root, count: int) -> dict[str, int]:
    """`count` small Parquet files in nested folders; returns relpath -> rows."""
    sizes = {}
    for i in range(count):
        n = i % 7  # includes empty files
        rel = f"shard={i % 4}/part-{i:04d}.parquet"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"id": [f"f{i}-r{j}" for j in range(n)], "prompt": [f"prompt {i} {j}" for j in range(n)]},
                     schema=pa.schema([("id", pa.string()), ("prompt", pa.string())])),
            path,
            row_group_size=2,
        )
        sizes[rel] = n
    return sizes


def test_planning_many_files_reads_footers_only(tmp_path, no_row_reads):
    sizes = write_many(tmp_path / "in", 200)
    (tmp_path / "in" / "_SUCCESS").write_text("")  # not data
    dataset = open_dataset(input_spec(tmp_path / "in", tmp_path))
    shards = plan(dataset.files, 3)

    assert no_row_reads == []
    assert len(dataset.files) == 200
    assert {f.relpath: f.num_rows for f in dataset.files} == sizes
    assert dataset.num_rows == sum(sizes.values())
    check_cover(shards, list(dataset.files), 3)
    assert len(shards) == sum(-(-n // 3) for n in sizes.values())
    assert all(s.url.startswith("file://") and s.url.endswith(s.relpath) for s in shards)
    assert [s.relpath for s in shards] == sorted(s.relpath for s in shards)
    assert dataset.schema.names == ["id", "prompt"]


def test_the_row_read_guard_does_bite(tmp_path, no_row_reads):
    # The guard above would prove nothing if reading rows went around it.
    write_many(tmp_path / "in", 2)
    spec = input_spec(tmp_path / "in", tmp_path)
    dataset = open_dataset(spec)
    with pytest.raises(AssertionError, match="read rows"):
        check_unique_ids(spec, dataset)  # this one reads the id column, on purpose
    assert no_row_reads


def test_driver_validate_reads_no_rows_without_id_column(tmp_path, tiny_model, no_row_reads):
    from jobs.validate import validate

    sizes = write_many(tmp_path / "in", 40)
    data = job_dict(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model, input={"id_column": None, "pass_through": []})
    checked = validate(spec_from_dict(data))
    assert no_row_reads == []
    assert checked.input_rows == sum(sizes.values())
    assert sum(s.num_rows for s in checked.shards) == checked.input_rows


def test_id_check_reads_only_the_id_column(tmp_path, monkeypatch):
    write_many(tmp_path / "in", 10)
    spec = input_spec(tmp_path / "in", tmp_path)
    dataset = open_dataset(spec)
    columns_read = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        columns_read.append(columns)
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    check_unique_ids(spec, dataset)
    assert columns_read and all(c == ["id"] for c in columns_read)


def test_footer_reads_touch_a_small_part_of_the_bytes(tmp_path, monkeypatch):
    # Large incompressible files: reading their rows would read most of their bytes.
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        table = pa.table({"id": [f"{i}-{j}" for j in range(300)], "prompt": [os.urandom(1500).hex() for _ in range(300)]})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=100, compression="none")
    total = sum(p.stat().st_size for p in root.iterdir())
    bytes_read = []
    original = LocalFileOpener.read

    def counting_read(self, *args, **kwargs):
        data = original(self, *args, **kwargs)
        bytes_read.append(len(data))
        return data

    monkeypatch.setattr(LocalFileOpener, "read", counting_read)
    dataset = open_dataset(input_spec(root, tmp_path))
    assert dataset.num_rows == 1200
    assert bytes_read, "footers were not read through fsspec: this check measures nothing"
    assert sum(bytes_read) < total / 10, (sum(bytes_read), total)


def test_auto_rows_per_shard_splits_a_small_input_and_caps_a_large_one():
    from jobs.core.plan import rows_per_shard

    assert rows_per_shard(50, 10) == 50  # a number is kept
    assert rows_per_shard("auto", 10) == 16  # never tiny shards
    assert rows_per_shard("auto", 64) == 16  # four shards: both replicas of a small machine get some
    assert rows_per_shard("auto", 300) == 19  # sixteen shards
    assert rows_per_shard("auto", 16_000) == 1000
    assert rows_per_shard("auto", 10_000_000) == 1000
