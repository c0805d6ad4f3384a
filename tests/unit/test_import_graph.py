"""maisi_cli's import graph, read from the source with `ast`: no cycle among its modules and no forbidden direction.

Every import counts, wherever it stands: at the top, inside a function (a cycle hidden there is still a cycle),
under `if TYPE_CHECKING:`, relative or absolute, `import a.b` or `from a import b` (an edge to `a.b` when `b` is a
module, else to `a`). Importing `a.b` runs `a/__init__.py` too, but that implicit edge is not counted: the graph
holds the imports a file writes.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = "maisi_cli"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# Data registries and the torch-free planning they use: importing them (for `maisi --help`, shell completion, the
# listing commands) must not reach the engine or torch, even through another maisi module.
REGISTRIES = ("maisi_cli.profiles", "maisi_cli.models", "maisi_cli.labels", "maisi_cli.plugins", "maisi_cli.config",
              "maisi_cli.decode_plan", "maisi_cli.gpu_memory")
HEAVY = ("torch", "monai")
CLI_ONLY = ("typer", "rich", "click")  # terminal libraries: the engine and the registries are used without a CLI

@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a maisi_cli module, or the top-level name of a third-party package
    where: str  # path:line of the import


def module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the package (a package is its __init__.py)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """(absolute dotted name, imported attribute or None, line) of every import in the tree: `import a.b` gives
    ("a.b", None), `from a import b` gives ("a", "b"): an edge to `a.b` if that is a module, else to `a`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - (node.level - 1)] + ([base] if base else []))
            found += [(base, None if alias.name == "*" else alias.name, node.lineno) for alias in node.names]
    return found


def import_edges(package_dir: Path) -> list[Edge]:
    """Every import of the package's modules: to the package's own modules (the longest module prefix of the
    name), else to the third-party package's top-level name."""
    modules = module_names(package_dir)
    package = package_dir.name
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for base, attribute, line in imported_names(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(package_dir.parent)}:{line}"
            name = f"{base}.{attribute}" if attribute and f"{base}.{attribute}" in modules else base
            if name == package or name.startswith(package + "."):
                parts = name.split(".")
                target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                               if ".".join(parts[:n]) in modules), None)
                if target is not None and target != module:
                    edges.add(Edge(module, target, where))
            elif name:
                edges.add(Edge(module, name.split(".")[0], where))
    return sorted(edges, key=lambda e: (e.source, e.target, e.where))


def internal_graph(edges: list[Edge], package: str = PACKAGE) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set())
        if edge.target == package or edge.target.startswith(package + "."):
            graph[edge.source].add(edge.target)
            graph.setdefault(edge.target, set())
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.add(member)
                    if member == node:
                        break
                if len(members) > 1:
                    components.append(frozenset(members))
    return components


def shortest_cycle(graph: dict[str, set[str]], members: frozenset[str]) -> list[str]:
    """One shortest cycle through the component's first module, as [a, b, ..., a] (breadth-first)."""
    start = min(members)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & members):
            if successor == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if successor not in parent:
                parent[successor] = node
                queue.append(successor)
    raise AssertionError(f"{sorted(members)} is not strongly connected")


def describe_cycle(cycle: list[str], edges: list[Edge]) -> str:
    steps = []
    for source, target in pairwise(cycle):
        where = next(e.where for e in edges if e.source == source and e.target == target)
        steps.append(f"{source} → {target} ({where})")
    return "; ".join(steps)


def import_cycles(edges: list[Edge]) -> list[str]:
    """A line per import cycle (a strongly connected group of modules), with the imports of its shortest cycle."""
    graph = internal_graph(edges)
    problems = []
    for members in strongly_connected(graph):
        if len(members) > 1:
            problems.append(f"import cycle among {', '.join(sorted(members))}: "
                            f"{describe_cycle(shortest_cycle(graph, members), edges)}")
    return problems


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def forbidden_edges(edges: list[Edge]) -> list[str]:
    """A line per import in a forbidden direction. Registries are checked through every maisi module they import,
    since importing them loads those too."""
    graph = internal_graph(edges)
    problems = []
    for edge in edges:
        if _inside(edge.source, ("maisi_cli.engine",)) and _inside(edge.target, ("maisi_cli.cli",)):
            problems.append(f"engine → cli: {edge.source} imports {edge.target} ({edge.where})")
        if _inside(edge.source, ("maisi_cli.io",)) and _inside(edge.target, ("maisi_cli.engine",)):
            problems.append(f"io → engine: {edge.source} imports {edge.target} ({edge.where})")
        if not _inside(edge.source, ("maisi_cli.cli",)) and _inside(edge.target, CLI_ONLY):
            problems.append(f"{edge.target} outside maisi_cli.cli: {edge.source} imports it ({edge.where})")
    for registry in REGISTRIES:
        reached = reachable(graph, registry)
        for edge in edges:
            if edge.source in reached and _inside(edge.target, ("maisi_cli.engine", *HEAVY)):
                via = "" if edge.source == registry else f" through {edge.source}"
                problems.append(f"registry → {edge.target}: {registry} reaches it{via} ({edge.where})")
    return problems


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen = {start}
    queue = deque([start])
    while queue:
        for successor in graph.get(queue.popleft(), set()):
            if successor not in seen:
                seen.add(successor)
                queue.append(successor)
    return seen


# --- the package -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(PACKAGE_DIR)


def test_no_import_cycle(edges):
    assert import_cycles(edges) == []


def test_no_forbidden_import_direction(edges):
    assert forbidden_edges(edges) == []


def test_every_module_is_read():
    names = module_names(PACKAGE_DIR)
    assert {"maisi_cli", "maisi_cli.cli.app", "maisi_cli.engine.masks.user", "maisi_cli.profiles"} <= set(names)


# --- the checks catch what they are for (a small package written to tmp_path) ------------------------------------
def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_cycle_hidden_in_a_function_is_reported_with_its_lines(tmp_path):
    package = _package(tmp_path, {
        "__init__.py": "",
        "engine/__init__.py": "",
        "engine/a.py": "def f():\n    from maisi_cli.engine import b\n",
        "engine/b.py": "from . import c\n",
        "engine/c.py": "import maisi_cli.engine.a as again\n",
        "engine/d.py": "from .a import f\n",  # imports into the cycle, not part of it
    })
    edges = import_edges(package)
    problems = import_cycles(edges)
    assert problems == [("import cycle among maisi_cli.engine.a, maisi_cli.engine.b, maisi_cli.engine.c: "
                         "maisi_cli.engine.a → maisi_cli.engine.b (maisi_cli/engine/a.py:2); "
                         "maisi_cli.engine.b → maisi_cli.engine.c (maisi_cli/engine/b.py:1); "
                         "maisi_cli.engine.c → maisi_cli.engine.a (maisi_cli/engine/c.py:1)")]


def test_forbidden_directions_are_reported(tmp_path):
    package = _package(tmp_path, {
        "__init__.py": "",
        "helpers.py": "def g():\n    import torch.nn\n",
        "profiles.py": "from maisi_cli import helpers\n",
        "models.py": "def f():\n    from .engine.memory import x\n",
        "engine/__init__.py": "",
        "engine/memory.py": "from maisi_cli.cli import render\nimport rich.console\n",
        "io/__init__.py": "",
        "io/files.py": "from ..engine import memory\n",
        "cli/__init__.py": "",
        "cli/app.py": "import typer\nfrom maisi_cli.engine import memory\n",  # cli → engine, typer: allowed
        "cli/render.py": "import rich\n",
    })
    assert forbidden_edges(import_edges(package)) == [
        "engine → cli: maisi_cli.engine.memory imports maisi_cli.cli.render (maisi_cli/engine/memory.py:1)",
        "rich outside maisi_cli.cli: maisi_cli.engine.memory imports it (maisi_cli/engine/memory.py:2)",
        "io → engine: maisi_cli.io.files imports maisi_cli.engine.memory (maisi_cli/io/files.py:1)",
        "registry → torch: maisi_cli.profiles reaches it through maisi_cli.helpers (maisi_cli/helpers.py:2)",
        "registry → maisi_cli.engine.memory: maisi_cli.models reaches it (maisi_cli/models.py:2)",
    ]
