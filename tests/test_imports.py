"""The layering of the code, checked on its source: which package may import which.

    jobs.core   the contracts both sides share: imports neither the driver (the
                rest of jobs) nor workers, and never ray or torch, anywhere
    workers     the replica side: of jobs, imports jobs.core only; the engine
                interface (workers.engine) imports neither ray nor torch at module level
    jobs        the driver side: reaches workers only for the actor class,
                workers.replica, and only from jobs/replica_pool.py

Every import counts, wherever it is written (inside functions, under
TYPE_CHECKING, relative ones), since a function-level import is still a
dependency; only "at module level" rules ignore the ones that never run at import.

And no import cycles among our modules (jobs, jobs.core, jobs.report, workers):
a cycle is a strongly connected component of the import graph, and the test
names its modules and the import lines that close it. A function-level import
counts here too (it only hides the cycle until that function runs); an import
under TYPE_CHECKING does not, since it never runs: it names a type for the
reader and the type checker, and a cycle of annotations costs nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "workers")
NEVER_IN_CORE = ("ray", "torch")
NOT_AT_MODULE_LEVEL = {"workers.engine": ("ray", "torch")}
DRIVER_MAY_IMPORT_FROM_WORKERS = {("jobs/replica_pool.py", "workers.replica")}


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module imported, resolved to a submodule where `from X import Y` names one
    module_level: bool  # runs when the importing module is imported
    type_checking: bool = False  # under `if TYPE_CHECKING:`: never runs


def module_name(relpath: str) -> str:
    parts = relpath.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_first_party_module(name: str, repo: Path) -> bool:
    base = repo.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(relpath: str, source: str, repo: Path = REPO) -> list[Import]:
    """Every import statement in `source`, the file at `relpath` under `repo`."""
    module = module_name(relpath)
    package = module if relpath.endswith("__init__.py") else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_checking: bool = False) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False, True)  # never runs
            for child in node.orelse:
                visit(child, module_level, type_checking)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name, module_level, type_checking) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if alias.name != "*" and _is_first_party_module(candidate, repo) else base
                found.append(Import(node.lineno, target, module_level, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, module_level, type_checking)

    visit(ast.parse(source, filename=relpath), True)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden(relpath: str, source: str, repo: Path = REPO) -> list[str]:
    """The layering rules `source` (the file at `relpath`) breaks: one 'file:line: edge: rule' each."""
    module = module_name(relpath)
    problems = []
    for imp in imports(relpath, source, repo):
        target, top = imp.target, imp.target.partition(".")[0]
        why = None
        if _within(module, "jobs.core"):
            if top in NEVER_IN_CORE:
                why = f"jobs.core never imports {top}, not even inside a function"
            elif top == "workers":
                why = "jobs.core imports nothing of the replica side (workers)"
            elif top == "jobs" and not _within(target, "jobs.core"):
                why = "jobs.core imports nothing of the driver side (jobs outside jobs.core)"
        elif top == "workers" and _within(module, "jobs"):
            if (relpath, target) not in DRIVER_MAY_IMPORT_FROM_WORKERS:
                why = "the driver side imports workers only as workers.replica (the actor class), in jobs/replica_pool.py"
        elif top == "jobs" and _within(module, "workers"):
            if not _within(target, "jobs.core"):
                why = "the replica side imports only jobs.core of jobs"
        if why is None and imp.module_level and top in NOT_AT_MODULE_LEVEL.get(module, ()):
            why = f"{module} does not import {top} at module level"
        if why:
            problems.append(f"{relpath}:{imp.line}: {module} -> {target}: {why}")
    return problems


def cycles(sources: dict[str, str], repo: Path = REPO) -> list[str]:
    """The import cycles among `sources` ({relpath: source}): one entry per strongly connected
    component of the graph of imports that run, listing its modules and every import line
    between them ('file:line: a -> b')."""
    graph: dict[str, dict[str, list[str]]] = {}  # module -> imported module -> the lines that import it
    for relpath, source in sorted(sources.items()):
        module = module_name(relpath)
        edges = graph.setdefault(module, {})
        for imp in imports(relpath, source, repo):
            line = f"{relpath}:{imp.line}: {module} -> {imp.target}"  # `from m import a, b`: one line
            if not imp.type_checking and imp.target != module and line not in edges.get(imp.target, ()):
                edges.setdefault(imp.target, []).append(line)
    found = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            members = set(component)
            lines = [line for m in sorted(members) for t, ls in graph[m].items() if t in members for line in ls]
            found.append(f"{' <-> '.join(sorted(members))}:\n    " + "\n    ".join(lines))
    return found


def _strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's algorithm over the modules of `graph` (imports of modules outside it lead nowhere)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def source_files() -> list[str]:
    return sorted(
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    )


# -- the code as it is -------------------------------------------------------------------------


def test_no_forbidden_import_edges():
    problems = [p for relpath in source_files() for p in forbidden(relpath, (REPO / relpath).read_text())]
    assert not problems, "forbidden imports:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    found = cycles({relpath: (REPO / relpath).read_text() for relpath in source_files()})
    assert not found, "import cycles (move what both sides need into a module below them):\n  " + "\n  ".join(found)


def test_the_walk_covers_both_packages_and_function_level_imports():
    files = source_files()
    for expected in (
        "jobs/core/spec.py",
        "jobs/core/__init__.py",
        "jobs/replica_pool.py",
        "workers/replica.py",
        "workers/engine.py",
    ):
        assert expected in files
    # The one allowed edge into workers is written inside a function: the walk must see it.
    pool = imports("jobs/replica_pool.py", (REPO / "jobs/replica_pool.py").read_text())
    assert [i for i in pool if i.target == "workers.replica" and not i.module_level]
    # And the replica side does use the shared contracts.
    assert any(
        _within(i.target, "jobs.core") for i in imports("workers/replica.py", (REPO / "workers/replica.py").read_text())
    )


def test_the_allowed_edge_is_still_needed():
    # An allowance the code no longer needs would quietly permit the edge again later.
    for relpath, target in DRIVER_MAY_IMPORT_FROM_WORKERS:
        assert target in {i.target for i in imports(relpath, (REPO / relpath).read_text())}, (relpath, target)


# -- the checker catches what it should --------------------------------------------------------

BAD = [
    (
        "jobs/core/spec.py",
        "def f():\n    from jobs.driver import run_job\n",
        "jobs/core/spec.py:2: jobs.core.spec -> jobs.driver",
    ),
    ("jobs/core/spec.py", "from ..validate import validate\n", "jobs/core/spec.py:1: jobs.core.spec -> jobs.validate"),
    ("jobs/core/plan.py", "from jobs import output\n", "jobs/core/plan.py:1: jobs.core.plan -> jobs.output"),
    ("jobs/core/rows.py", "import jobs\n", "jobs/core/rows.py:1: jobs.core.rows -> jobs:"),
    (
        "jobs/core/rows.py",
        "from workers.shard_io import stage\n",
        "jobs/core/rows.py:1: jobs.core.rows -> workers.shard_io",
    ),
    ("jobs/core/model.py", "def load():\n    import torch\n", "jobs/core/model.py:2: jobs.core.model -> torch"),
    ("jobs/core/__init__.py", "import ray.util\n", "jobs/core/__init__.py:1: jobs.core -> ray.util"),
    ("workers/replica.py", "from jobs import driver\n", "workers/replica.py:1: workers.replica -> jobs.driver"),
    (
        "workers/shard_io.py",
        "x = 1\n\ndef f():\n    from jobs.output import OutputDir\n",
        "workers/shard_io.py:4: workers.shard_io -> jobs.output",
    ),
    ("workers/engine.py", "import ray\n", "workers/engine.py:1: workers.engine -> ray"),
    ("workers/engine.py", "from torch import nn\n", "workers/engine.py:1: workers.engine -> torch"),
    ("jobs/output.py", "from workers.replica import Replica\n", "jobs/output.py:1: jobs.output -> workers.replica"),
    ("jobs/dispatch.py", "def f():\n    from workers.replica import Replica\n", "jobs/dispatch.py:2: jobs.dispatch -> workers.replica"),
    (
        "jobs/dispatch.py",
        "def f():\n    from workers.shard_io import stage\n",
        "jobs/dispatch.py:2: jobs.dispatch -> workers.shard_io",
    ),
    ("jobs/dispatch.py", "from workers import engine\n", "jobs/dispatch.py:1: jobs.dispatch -> workers.engine"),
]


@pytest.mark.parametrize("relpath, source, expected", BAD)
def test_the_checker_catches_a_forbidden_edge(relpath, source, expected):
    problems = forbidden(relpath, source)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


GOOD = [
    ("jobs/core/spec.py", "from jobs.core.errors import SpecError\nfrom . import rows\n"),
    ("jobs/core/model.py", "def load():\n    from transformers import AutoTokenizer\n"),
    ("workers/replica.py", "from jobs.core import faults, storage\nimport torch\nimport ray\n"),
    (
        "workers/engine.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n\ndef f():\n    import ray\n",
    ),
    ("jobs/replica_pool.py", "def launch():\n    from workers.replica import Replica\n"),
    ("jobs/driver.py", "import ray\nfrom jobs import dispatch\nfrom .validate import validate\n"),
]


@pytest.mark.parametrize("relpath, source", GOOD)
def test_the_checker_lets_allowed_edges_through(relpath, source):
    assert forbidden(relpath, source) == []


def test_relative_imports_resolve_to_modules():
    found = imports("jobs/core/spec.py", "from . import rows\nfrom .errors import SpecError\nfrom .. import dispatch\n")
    assert [i.target for i in found] == ["jobs.core.rows", "jobs.core.errors", "jobs.dispatch"]


# -- the cycle check catches what it should ----------------------------------------------------


def test_the_cycle_check_catches_a_two_module_cycle():
    found = cycles({
        "jobs/core/prompts.py": "from jobs.core.spec import InputSpec\n",
        "jobs/core/spec.py": "def f():\n    from jobs.core import prompts\n",
        "jobs/core/plan.py": "from jobs.core.spec import JobSpec\n",  # imports into the cycle, not part of it
    })  # fmt: skip
    assert found == [
        "jobs.core.prompts <-> jobs.core.spec:\n"
        "    jobs/core/prompts.py:1: jobs.core.prompts -> jobs.core.spec\n"
        "    jobs/core/spec.py:2: jobs.core.spec -> jobs.core.prompts"
    ]


def test_the_cycle_check_catches_a_longer_cycle_through_relative_imports():
    found = cycles({
        "workers/engine.py": "def create():\n    from .vllm_engine import VllmEngine\n",
        "workers/vllm_engine.py": "from workers.sampling import pick\n",
        "workers/sampling.py": "from . import engine\n",
    })  # fmt: skip
    assert len(found) == 1
    assert found[0].startswith("workers.engine <-> workers.sampling <-> workers.vllm_engine:")
    for line in ("workers/engine.py:2:", "workers/vllm_engine.py:1:", "workers/sampling.py:1:"):
        assert line in found[0]


def test_the_cycle_check_lets_type_checking_imports_and_layers_through():
    assert cycles({
        "jobs/core/rows.py": "from typing import TYPE_CHECKING\n"
                             "if TYPE_CHECKING:\n    from jobs.core.spec import JobSpec\n",
        "jobs/core/spec.py": "from jobs.core import rows\n",
        "jobs/driver.py": "from jobs.core import spec\nfrom jobs import output\n",
        "jobs/output.py": "from jobs.core.rows import GENERATED\n",
    }) == []  # fmt: skip


def test_run_starts_its_replicas_without_torch_in_the_driver(tmp_path):
    """On its own Ray, `bulkgen run`'s checks leave the model to the replicas and launching the
    actor class imports only the replica's light modules: the driver imports neither torch nor
    transformers (~3 core-seconds that the replicas, importing the same, need on 2 cores)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, jobs.cli, jobs.driver\n"
        "from jobs.core.spec import load_spec\n"
        "from jobs.validate import check_input_and_model\n"
        "from workers.replica import Replica\n"
        "check_input_and_model(load_spec('examples/demo/job.yaml'), replicas_check_model=True)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
