"""The README stays true: its spec reference, its example job and its test command."""

import re

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
