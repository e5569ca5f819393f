"""The house rules of docs/architecture.md, checked on the code's own imports.

The floors are read from the ``layers`` block of docs/architecture.md; the imports from
every module of the project (module level and inside functions alike). A module may import
its own floor and the floors below; packages that share a floor may not import each other;
no two modules may import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
OUTSIDE = ("tests", "benchmarks")  # may import any floor; nothing imports them


def floors(doc: Path) -> list[list[str]]:
    """The ``layers`` block, lowest floor first: each floor's packages."""
    block = re.search(r"```layers\n(.*?)```", doc.read_text(), re.S)
    if block is None:
        raise AssertionError(f"{doc} has no ```layers block")
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    return [[p.strip() for p in line.split("|")] for line in reversed(lines)]


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the top-level ``packages``."""
    out = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body (``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c -> a.b -> a
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def floor_of(module: str, plan: list[list[str]]) -> tuple[int, str] | None:
    """(floor number, package) of a module: its longest matching package prefix."""
    best = None
    for level, packages in enumerate(plan):
        for package in packages:
            if module == package or module.startswith(package + "."):
                if best is None or len(package) > len(best[1]):
                    best = (level, package)
    return best


def upward_imports(graph: dict[str, set[str]], plan: list[list[str]]) -> list[str]:
    """Every import that goes up a floor or sideways to another package of its floor."""
    out = []
    for module, targets in sorted(graph.items()):
        here = floor_of(module, plan)
        if here is None:
            continue
        for target in sorted(targets):
            there = floor_of(target, plan)
            if there is None:
                out.append(f"{module} -> {target} (outside the house)")
            elif there[0] > here[0]:
                out.append(f"{module} -> {target} (up from {here[1]} to {there[1]})")
            elif there[0] == here[0] and there[1] != here[1]:
                out.append(f"{module} -> {target} (sideways, {here[1]} to {there[1]})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def import_graph(root: Path, plan: list[list[str]]) -> dict[str, set[str]]:
    tops = {p.split(".")[0] for packages in plan for p in packages}
    known = modules(root, tops)
    return {name: imports(name, path, known) for name, path in known.items()}


# --- the check on this repository ------------------------------------------------------


@pytest.fixture(scope="module")
def plan() -> list[list[str]]:
    return floors(DOC)


@pytest.fixture(scope="module")
def graph(plan: list[list[str]]) -> dict[str, set[str]]:
    return import_graph(REPO, plan)


def test_the_doc_names_every_package_of_the_repository(plan: list[list[str]]) -> None:
    named = {p.split(".")[0] for packages in plan for p in packages}
    on_disk = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()
               or (p.is_dir() and p.name == "dags")}
    assert on_disk - set(OUTSIDE) <= named, "a package is missing from docs/architecture.md"
    assert len(plan) >= 5


def test_no_import_goes_up_or_sideways(graph: dict[str, set[str]],
                                       plan: list[list[str]]) -> None:
    assert len(graph) > 60  # the whole project was read
    assert upward_imports(graph, plan) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_server_imports_nothing_from_evaluation(graph: dict[str, set[str]]) -> None:
    reached, todo = set(), ["serving.app"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert "training.ranking.scorer" in reached
    assert sorted(m for m in reached if m.startswith("training.evaluation")) == []


# --- the check itself can fail ---------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


PLAN = [["low"], ["mid_a", "mid_b"], ["top"]]


def test_an_upward_import_inside_a_function_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "", "mid_a/__init__.py": "", "mid_b/__init__.py": "",
        "top/__init__.py": "", "top/cli.py": "import low\n",
        "low/settings.py": "def f():\n    from top.cli import main\n",
        "mid_a/x.py": "from ..mid_b import y\n", "mid_b/y.py": "from low import settings\n",
    })
    found = upward_imports(import_graph(root, PLAN), PLAN)
    assert found == ["low.settings -> top.cli (up from low to top)",
                     "mid_a.x -> mid_b.y (sideways, mid_a to mid_b)"]


def test_a_cycle_through_function_bodies_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "", "low/a.py": "from low.b import g\n",
        "low/b.py": "def g():\n    from low import c\n",
        "low/c.py": "def h():\n    import low.a\n", "low/d.py": "from low import a\n",
    })
    assert cycles(import_graph(root, [["low"]])) == [["low.a", "low.b", "low.c"]]


def test_the_layers_block_is_read_lowest_first(tmp_path: Path) -> None:
    doc = _tree(tmp_path, {"a.md": "text\n```layers\ntop\nmid_a | mid_b\nlow\n```\n"}) / "a.md"
    assert floors(doc) == PLAN
