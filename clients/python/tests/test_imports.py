"""The package's modules form a layered graph: no module imports, even
indirectly, a module that imports it.

Circular imports work in Python until someone reorders an import, imports a
submodule on its own first, or turns a ``TYPE_CHECKING`` import into a real
one; then they fail with a half-initialised module. So the rule is checked on
the source itself (every import statement, including ``TYPE_CHECKING`` blocks
and function bodies, which only hide a cycle until run time), and each module
is imported first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PKG = Path(__file__).resolve().parents[1]
SOURCE = PKG / "src" / "backstop"
#: Generated gRPC code: one node (its modules import only each other and protobuf).
GENERATED = "backstop._proto"


def package_modules(root: Path = SOURCE) -> Dict[str, Path]:
    """Hand-written modules of the package under ``root``, by dotted name (generated stubs excluded)."""
    out: Dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name != GENERATED and not name.startswith(GENERATED + "."):
            out[name] = path
    return out


def _owner(name: str, known: Set[str]) -> Optional[str]:
    """The package module an imported dotted name lives in (None: outside the package)."""
    if name == GENERATED or name.startswith(GENERATED + "."):
        return GENERATED
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the package modules it imports, from every import statement in it.

    ``from . import x`` is an edge to the submodule ``x`` when there is one, else
    to the package's ``__init__`` (which defines ``x``). Loading a parent package
    before its submodule is implicit in Python and not counted.
    """
    known = set(modules)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
            for n in names:
                dep = _owner(n, known)
                if dep is not None and dep not in (mod, GENERATED):
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle (as a path that ends where it starts), or None."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_is_acyclic() -> None:
    graph = import_graph(package_modules())
    assert len(graph) >= 10, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "circular import: " + " -> ".join(cycle or [])


def test_the_layers() -> None:
    """The shape the package is built on: each client and the guard depend on
    the shared parts, never on each other."""
    graph = import_graph(package_modules())

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            m = todo.pop()
            if m == b:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return False

    assert not reaches("backstop.guard", "backstop.client") and not reaches("backstop.guard", "backstop.aio")
    assert not reaches("backstop.aio", "backstop.client") and not reaches("backstop.client", "backstop.aio")
    for shared in ("backstop._core", "backstop._transport", "backstop._convert", "backstop._local", "backstop._reconcile"):
        assert not reaches(shared, "backstop.client") and not reaches(shared, "backstop.aio"), shared
    assert graph["backstop.guard"] <= {"backstop._classify", "backstop.errors", "backstop.types"}, graph["backstop.guard"]


def test_the_cycle_check_finds_cycles(tmp_path: Path) -> None:
    """The check itself: a TYPE_CHECKING import, a function-level import and a
    `from . import x` each close a cycle it must report."""
    pkg = tmp_path / "backstop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .b import B\nclass A: ...\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nclass B: ...\n"
    )
    (pkg / "c.py").write_text("def f():\n    from . import d\n")
    (pkg / "d.py").write_text("import backstop.c\n")
    (pkg / "e.py").write_text("from . import a\n")
    graph = import_graph(package_modules(pkg))
    assert graph["backstop.b"] == {"backstop.a"} and graph["backstop.c"] == {"backstop.d"}
    assert graph["backstop.e"] == {"backstop.a"}, "`from . import a` is an edge to a, not to __init__"
    assert find_cycle(graph) == ["backstop.a", "backstop.b", "backstop.a"]
    del graph["backstop.a"]
    assert find_cycle(graph) == ["backstop.c", "backstop.d", "backstop.c"]
    del graph["backstop.c"]
    assert find_cycle(graph) is None


def _all_module_names() -> List[str]:
    names = sorted(package_modules())
    assert "backstop" in names
    return names


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """One interpreter per module: that module is imported first, then every
    other one. The orders are the rotations of the module list, so every
    module comes first once and every pair is imported in both orders."""
    names = _all_module_names()
    procs = []
    for i in range(len(names)):
        order = names[i:] + names[:i]
        code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in order)
        procs.append((order[0], subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)))
    failures = []
    for first, p in procs:
        _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            failures.append(f"importing {first} first:\n{err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("statement", ["import backstop.guard", "import backstop.aio", "from backstop.client import Backstop"])
def test_single_imports(statement: str) -> None:
    out = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
