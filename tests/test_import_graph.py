"""The package's import graph: no circle, and no import from a lower floor to a higher one.

Read from the source with :mod:`ast` (every ``import`` / ``from ... import`` anywhere in a file,
the ones inside functions too: a lazy import is still a dependency). A unit is a top-level module
or sub-package of ``scope_opd``; the floors below read as the flow of one training step, bottom up:
rollout -> verify -> teacher -> weights -> loss -> update, with the problems and data under the
trainer and the applications on top. ``docs/contributing.md`` draws the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scope_opd

PACKAGE = Path(scope_opd.__file__).resolve().parent
ROOT_INIT = "__init__"  # the package's own __init__ (it re-exports the trainer: it sits on top)

# Bottom to top. A unit may import units on its own floor or below, never above.
FLOORS: list[tuple[str, set[str]]] = [
    ("foundations", {"version", "algorithms", "metrics", "prompts", "checkpointing"}),
    ("rollout", {"sampling", "sampler_logprobs"}),
    ("verify", {"verifiers"}),
    ("teacher", {"teachers"}),
    ("weights", {"batch"}),
    ("problems and data", {"evaluation", "data", "toy", "tasks"}),
    ("loss and update", {"trainer", "kd"}),
    ("applications", {"analysis", "integrations", "train_cli"}),
    ("entry points", {"demo", "cli", ROOT_INIT}),
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = ("scope_opd", *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(package: Path = PACKAGE) -> set[tuple[str, str]]:
    """(importer, imported) between modules of the package, resolved to the module file imported."""
    files = {module_name(f, package): f for f in package.rglob("*.py")}
    edges = set()
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        # Imports under `if TYPE_CHECKING:` never run (annotations only): they are not edges of the graph.
        type_only = {id(inner) for node in ast.walk(tree)
                     if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
                     for stmt in node.body for inner in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of an attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add((name, target))
    return edges


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_INIT


def floor_of(unit_name: str) -> int:
    for index, (_, units) in enumerate(FLOORS):
        if unit_name in units:
            return index
    raise AssertionError(f"scope_opd.{unit_name} is on no floor: add it to FLOORS (and to docs/contributing.md)")


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a circle of imports."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(edges: set[tuple[str, str]]) -> list[str]:
    return sorted(f"{a} (floor {FLOORS[floor_of(unit(a))][0]}) imports {b} (floor {FLOORS[floor_of(unit(b))][0]})"
                  for a, b in edges if floor_of(unit(b)) > floor_of(unit(a)))


def test_every_unit_of_the_package_is_on_a_floor():
    units = {unit(module_name(f)) for f in PACKAGE.rglob("*.py")}
    for name in sorted(units):
        floor_of(name)


def test_the_import_graph_has_no_circle():
    assert circles(import_edges()) == []


def test_no_module_imports_a_higher_floor():
    assert upward_imports(import_edges()) == []


# The checks themselves, on small packages written for the purpose: they must see what they look for.


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "scope_opd"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_circle_check_finds_two_modules_importing_each_other_even_lazily(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "evaluation/__init__.py": "",
        "evaluation/benchmarks.py": "from .code_benchmarks import X\n",
        "evaluation/code_benchmarks.py": "def f():\n    from .benchmarks import read_rows\n",
    })
    assert circles(import_edges(root)) == [["scope_opd.evaluation.benchmarks", "scope_opd.evaluation.code_benchmarks"]]


@pytest.mark.parametrize(("importer", "line", "expected"), [
    ("evaluation/evaluate.py", "from .. import __version__\n", "scope_opd.evaluation.evaluate (floor problems and data) "
                                                               "imports scope_opd (floor entry points)"),
    ("analysis/cli.py", "def f():\n    from ..demo import run\n", "scope_opd.analysis.cli (floor applications) "
                                                                    "imports scope_opd.demo (floor entry points)"),
    ("sampling.py", "import scope_opd.trainer\n", "scope_opd.sampling (floor rollout) imports scope_opd.trainer "
                                                   "(floor loss and update)"),
])
def test_the_floor_check_finds_an_import_that_climbs(tmp_path, importer, line, expected):
    root = _package(tmp_path, {"__init__.py": "", "evaluation/__init__.py": "", "analysis/__init__.py": "",
                               "demo/__init__.py": "", "trainer.py": "", importer: line})
    assert upward_imports(import_edges(root)) == [expected]
