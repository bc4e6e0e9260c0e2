"""The shape of the code: one direction of imports, and every benchmark still imports."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PIPELINE = REPO / "pipeline"
JOBS = ("label", "train", "audit")


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


@pytest.mark.parametrize(("job", "other"), [("label", "train"), ("train", "label"), ("audit", "label"),
                                            ("label", "audit"), ("train", "audit")])
def test_the_jobs_never_import_each_other(job, other):
    """Labeling and training stand apart; the audit reads what training reads (its data layer), nothing of
    labeling's, and neither job uses it."""
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports_of(p) if within(m, f"pipeline.{other}"))
                 for p in sorted((PIPELINE / job).rglob("*.py"))}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_shared_level_imports_neither_job():
    shared = sorted(PIPELINE.glob("*.py")) + sorted((PIPELINE / "formats").glob("*.py"))
    assert len(shared) > 5  # the glob found the modules
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imports_of(p)
                                                  if any(within(m, f"pipeline.{job}") for job in JOBS))
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


def test_the_formats_layer_imports_no_torch_or_ray():
    """Read workers and the driver's checks import it; torch and Ray take seconds and hundreds of MiB."""
    modules = [f"pipeline.formats.{p.stem}" for p in sorted((PIPELINE / "formats").glob("*.py"))]
    assert len(modules) > 4
    script = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
              "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'torchvision', 'ray', 'timm'}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


def module_graph() -> dict[str, set[str]]:
    """pipeline's modules and the pipeline modules each imports (at its top or inside functions)."""
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PIPELINE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in paths and m != name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the modules (a depth-first search; packages count as the modules they name)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_pipeline_has_no_import_cycle():
    graph = module_graph()
    assert "pipeline.formats.checkpoint" in graph and "pipeline.models" in graph["pipeline.label.job"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
