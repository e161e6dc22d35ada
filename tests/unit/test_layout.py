"""The package's shape (issue 21): no import cycle anywhere inside lksmfs/, counting
every import a file makes (top level, under TYPE_CHECKING, inside functions); the top
level is the public face; package __init__ files import nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "lksmfs"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module in lksmfs/ (a package by its __init__)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lksmfs modules `name` imports: `import a.b`, `from a import b` (a.b when it is a
    module, else a itself), relative imports resolved; every statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import lksmfs.x.y` of a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("lksmfs") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path a -> ... -> a, or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state and (got := visit(w)) is not None:
                return got
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (got := visit(v)) is not None:
            return got
    return None


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A cycle made only of a TYPE_CHECKING import and a function-level one is found."""
    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lksmfs.b import X\n")
    b.write_text("def f():\n    from lksmfs import a\n")
    known = {"lksmfs.a": a, "lksmfs.b": b}
    edges = {n: imports(n, p, known) for n, p in known.items()}
    assert edges == {"lksmfs.a": {"lksmfs.b"}, "lksmfs.b": {"lksmfs.a"}}
    assert find_cycle(edges) in (["lksmfs.a", "lksmfs.b", "lksmfs.a"], ["lksmfs.b", "lksmfs.a", "lksmfs.b"])


def test_no_import_cycle_inside_lksmfs() -> None:
    edges = graph()
    assert len(edges) > 50  # the walk found the package
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_no_cycle_even_through_parent_packages() -> None:
    """Importing lksmfs.a.b runs lksmfs/a/__init__.py first: counted as an import too,
    there is still no cycle (every package's __init__ imports nothing)."""
    edges = graph()
    for name in list(edges):
        parent = name.rpartition(".")[0]
        while parent:
            edges[name].add(parent)
            parent = parent.rpartition(".")[0]
        edges[name].discard(name)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


@pytest.mark.parametrize("init", sorted(p.relative_to(PKG.parent).as_posix() for p in PKG.rglob("__init__.py")
                                        if p.parent != PKG))
def test_package_init_imports_nothing(init: str) -> None:
    tree = ast.parse((PKG.parent / init).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], init


def test_the_top_level_is_the_public_face() -> None:
    """Commands in commands/, the long-running parts in daemon/; beside the packages only
    the entry point (cli, __main__) and the configuration."""
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    files = {p.stem for p in PKG.glob("*.py")}
    assert packages == {"commands", "daemon", "engine", "sources", "sysfs", "system", "workload"}
    assert files == {"__init__", "__main__", "cli", "config"}


def test_layers() -> None:
    """Who may import whom: the engine only itself and the source interface; the
    library (engine, sources, sysfs, system, workload) never the commands or the daemon;
    system nothing of lksmfs."""
    edges = graph()

    def top(name: str) -> str:
        return name.split(".")[1] if name.count(".") else ""

    for name, deps in edges.items():
        layer = top(name)
        for dep in deps:
            if layer == "engine":
                assert top(dep) == "engine" or dep == "lksmfs.sources.base", (name, dep)
            if layer in ("engine", "sources", "sysfs", "system", "workload"):
                assert top(dep) not in ("commands", "daemon"), (name, dep)
            if layer == "system":
                assert top(dep) == "system", (name, dep)
