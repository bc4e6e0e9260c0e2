"""The shape of the code: one direction of imports, and every benchmark still imports."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO

PIPELINE = REPO / "pipeline"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module that the source of a module in `package` imports, at its top or inside functions, as absolute
    dotted names."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), ".".join(path.relative_to(REPO).parts[:-1]))


@pytest.mark.parametrize(("job", "other"), [("label", "train"), ("train", "label")])
def test_the_two_jobs_never_import_each_other(job, other):
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports_of(p) if within(m, f"pipeline.{other}"))
                 for p in sorted((PIPELINE / job).rglob("*.py"))}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_shared_level_imports_neither_job():
    shared = sorted(PIPELINE.glob("*.py"))
    assert len(shared) > 5  # the glob found the modules
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports_of(p)
                                                  if within(m, "pipeline.label") or within(m, "pipeline.train"))
                 for p in shared}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_rule_sees_imports_inside_functions_and_relative_ones():
    source = "import os\ndef f():\n    from pipeline.train import loop\n    from ..train import data\n"
    assert imported_modules(source, "pipeline.label") == {"os", "pipeline.train", "pipeline.train.loop",
                                                          "pipeline.train.data"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_imports(name):
    """A rename in pipeline/ breaks a benchmark here, not the next time someone measures."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__  # each says what it measures
