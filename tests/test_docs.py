"""The README stays true: its spec reference, its example job and its test command; and so do
the packages' docstrings, which list their modules."""

import ast
import re

import pytest

from jobs.core.spec import load_spec, reference_markdown
from tests.conftest import REPO


def test_readme_spec_reference_is_generated_from_the_spec():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- spec-reference:start -->\n(.*)\n<!-- spec-reference:end -->", readme, re.S)
    assert block, "README lost its spec reference markers"
    assert block.group(1) == reference_markdown(), "README spec reference is stale: paste `python -m jobs.core.spec`"


def test_demo_job_loads():
    spec = load_spec(REPO / "examples/demo/job.yaml")
    assert spec.input.id_column == "id"
    assert (REPO / "examples/demo/prompts.parquet").exists()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci/run").read_text()


@pytest.mark.parametrize("package", ["jobs", "jobs/core", "jobs/report", "workers"])
def test_package_docstring_lists_its_modules(package):
    directory = REPO / package
    doc = ast.get_docstring(ast.parse((directory / "__init__.py").read_text()), clean=False)
    listed = set(re.findall(r"^ {4}(\w+)(?:\.py|/)? ", doc, re.M))  # "    name  what it holds", one a line
    present = {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}
    present |= {d.name for d in directory.iterdir() if (d / "__init__.py").is_file()}
    extra, missing = sorted(listed - present), sorted(present - listed)
    assert listed == present, f"{package}/__init__.py lists {extra}, which are no modules, and misses {missing}"
