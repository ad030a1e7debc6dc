"""What `pip install .` ships (the image, a wheel): every package of the code, not only those an
editable install (the tests' own) happens to find on the path."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent


def packaged(config: dict) -> set[str]:
    """The packages a pyproject's [tool.setuptools] section puts in a wheel."""
    setuptools = config["tool"]["setuptools"]
    if isinstance(setuptools.get("packages"), list):
        return set(setuptools["packages"])
    found = setuptools["packages"]["find"]
    return set(find_packages(str(REPO), include=found.get("include", ["*"]), exclude=found.get("exclude", ())))


def code_packages() -> set[str]:
    return {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("jobs", "workers")
        for init in (REPO / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_every_package_of_the_code_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    missing = code_packages() - packaged(config)
    assert not missing, f"pyproject.toml leaves these packages out of `pip install .`: {sorted(missing)}"
    assert "workers.stages" in code_packages()  # the walk does find subpackages


def test_the_check_catches_a_package_left_out():
    explicit = {"tool": {"setuptools": {"packages": ["jobs", "jobs.core", "jobs.report", "workers"]}}}
    assert "workers.stages" in code_packages() - packaged(explicit)
