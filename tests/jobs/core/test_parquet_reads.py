"""Every Parquet read bulkgen makes runs on the thread that asked for it.

pyarrow's default reads use its own I/O and CPU threads; the last of them to let go of a
Python file frees it under the GIL, and when that happens as the interpreter exits the
process aborts: `bulkgen run` once ended with SIGABRT after printing its success. These
tests watch which threads read each file, through every reader the driver, the replicas
and the report use."""

from __future__ import annotations

import pathlib
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import batch_output, dataset
from jobs.core import storage
from jobs.core.spec import InputSpec
from jobs.report import data as report_data
from jobs.report.data import read_output
from tests.jobs.test_report import make_output

ROWS, GROUP = 200, 20  # several row groups, so pyarrow has work to spread over threads
REPO = pathlib.Path(__file__).resolve().parents[3]


class ThreadSpy:
    """A file object that notes each thread that reads or seeks it."""

    def __init__(self, f, threads: set[threading.Thread]):
        self._f, self._threads = f, threads

    def read(self, *args):
        self._threads.add(threading.current_thread())
        return self._f.read(*args)

    def seek(self, *args):
        self._threads.add(threading.current_thread())
        return self._f.seek(*args)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def readers(monkeypatch) -> set[threading.Thread]:
    """The threads that read any Parquet file bulkgen opens during the test."""
    threads: set[threading.Thread] = set()
    real = storage.open_parquet

    def spied(source):
        return real(ThreadSpy(source, threads))

    monkeypatch.setattr(storage, "open_parquet", spied)
    monkeypatch.setattr(report_data, "open_parquet", spied)
    return threads


def _started_by_python(threads: set[threading.Thread]) -> list[str]:
    # pyarrow's own threads show up as threading's dummies when they call into Python.
    return sorted(t.name for t in threads if isinstance(t, threading._DummyThread))


@pytest.fixture
def input_file(tmp_path) -> str:
    table = pa.table({"id": [f"row-{i}" for i in range(ROWS)], "prompt": [f"prompt {i} " * 8 for i in range(ROWS)],
                      "note": [f"note {i}" for i in range(ROWS)]})
    path = tmp_path / "input.parquet"
    pq.write_table(table, path, row_group_size=GROUP)
    return f"file://{path}"


def test_the_storage_readers_read_on_the_calling_thread(readers, input_file):
    assert storage.read_parquet(input_file, {}).num_rows == ROWS
    assert storage.read_row_range(input_file, {}, 15, 95, ["id", "prompt"]).column("id")[0].as_py() == "row-15"
    listed = storage.read_rows(input_file, {}, [3, 41, 42, 180], ["id", "note"])
    assert listed.column("id").to_pylist() == ["row-3", "row-41", "row-42", "row-180"]
    assert readers and not _started_by_python(readers)


def test_the_input_scan_reads_on_its_own_threads(readers, input_file):
    spec = InputSpec(uri=input_file, prompt_column="prompt", id_column="id")
    found = dataset.open_dataset(spec)
    ids = [i for table, _, _ in dataset.iter_row_groups(spec, found, ["id"], "input.id_column") for i in
           table.column("id").to_pylist()]
    assert ids == [f"row-{i}" for i in range(ROWS)]
    assert readers and not _started_by_python(readers)


def test_the_report_and_batch_output_read_on_their_own_threads(readers, tmp_path):
    make_output(str(tmp_path / "out"), scores=True, filtered=True)
    found = read_output(str(tmp_path / "out"), {})
    assert found.rows > 0 and found.filtered.counts and found.sample and not found.unreadable_files
    data_file = min((tmp_path / "out" / "data").rglob("*.parquet"))
    assert batch_output._read_data(f"file://{data_file}", {}, ["id", "text"], ["reasoning"])
    assert readers and not _started_by_python(readers)


def test_every_parquet_file_is_opened_through_open_parquet():
    """A new reader that opens Parquet with pyarrow's defaults would bring the abort back."""
    opened = re.compile(r"pq\.(ParquetFile|read_table|read_metadata|ParquetDataset)\(|^\s*(import|from) pyarrow\.dataset")
    found = [f"{path.relative_to(REPO)}:{n}" for top in ("jobs", "workers") for path in (REPO / top).rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if opened.search(line) and not path.match("jobs/core/storage.py")]
    assert found == []

