"""The package layout's rules, read from the source: no import cycle among the project's modules,
dependencies pointing one way (deployments -> engine -> model -> kernels), nothing below
deployments importing Ray or an HTTP framework, and the replica process free of HTTP code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "kernels", "engine", "deployments", "autoscaling", "monitoring",
            "benchmarks")
HTTP = ("fastapi", "starlette", "uvicorn", "httpx")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


MODULES = _modules()


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """Modules `name` imports (project modules by their own name, others by their top package).
    top_level_only: only what runs at import time (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            sub_modules = subs & MODULES.keys()
            found |= sub_modules if sub_modules else {node.module}
    return {m if m in MODULES else m.split(".")[0] for m in found}


def project_imports(name: str, top_level_only: bool = True) -> set[str]:
    return {m for m in imports(name, top_level_only) if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {m: project_imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("pkg, may_not", [
    ("kernels", ("model", "engine", "deployments")),
    ("model", ("engine", "deployments")),
    ("engine", ("deployments",)),
])
def test_dependencies_point_one_way(pkg, may_not):
    bad = {m: sorted(d for d in project_imports(m, top_level_only=False)
                     if d.split(".")[0] in may_not)
           for m in MODULES if m.split(".")[0] == pkg}
    assert {m: d for m, d in bad.items() if d} == {}


@pytest.mark.parametrize("pkg", ["model", "kernels", "engine", "autoscaling"])
def test_nothing_below_deployments_imports_ray_or_http(pkg):
    bad = {m: sorted(imports(m) & {"ray", *HTTP}) for m in MODULES if m.split(".")[0] == pkg}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_replica_process_imports_no_http_framework():
    """What a ModelServer replica loads at import time, transitively, holds no HTTP code."""
    seen, todo = set(), ["deployments.replica", "deployments.tensor_parallel"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        assert not imports(m, top_level_only=True) & set(HTTP), m
        todo += project_imports(m)
