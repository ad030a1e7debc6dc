"""Every output path comes from jobs/core/layout.py, and no other module spells one."""

from __future__ import annotations

import re

from jobs.core import layout
from jobs.core.layout import OutputLayout
from tests.conftest import REPO


def test_paths_of_the_documented_layout():
    out = OutputLayout("s3://bucket/run/")
    assert out.uri == "s3://bucket/run"
    assert out.url(layout.RECORD) == "s3://bucket/run/_job.json"
    assert out.data(3) == "data/part-00003.parquet"
    assert out.errors(3) == "errors/part-00003.parquet"
    assert out.filtered(3) == "filtered/part-00003.parquet"
    assert out.commit(3) == "_commits/part-00003.json"
    assert out.staging(3) == "_staging/part-00003"
    assert out.staged_file(layout.DATA, 3, "attempt-1-ab") == "_staging/part-00003/attempt-1-ab/data.parquet"
    assert out.staged_file(layout.ERRORS, 3, "attempt-1-ab") == "_staging/part-00003/attempt-1-ab/errors.parquet"
    assert out.run_log(2) == "_logs/run-2.log"
    # --overwrite deletes what a job writes; the record goes last, since it claims the output.
    assert layout.JOB_ENTRIES[-1] == layout.RECORD


def test_no_other_module_spells_an_output_path():
    # A quoted bookkeeping name ("_job.json", "_commits", ...) or a data/errors path outside layout.py.
    spelled = re.compile(r"""["'](_job\.json|_manifest\.json|_SUCCESS|_CANCEL|_commits|_staging|_logs|_report)\b"""
                         r"""|["'/](data|errors|filtered)/(part|\{)|url\(["'](data|errors|filtered)["']\)""")
    offenders = []
    for path in sorted([*REPO.glob("jobs/**/*.py"), *REPO.glob("workers/**/*.py")]):
        if path.name == "layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if spelled.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "output paths spelled outside jobs/core/layout.py:\n" + "\n".join(offenders)
