"""The engine's imports form a tree under its façade, and the engine is pure.

Every import statement counts: top-level, under TYPE_CHECKING, and inside functions.
The parts reach the façade only through the protocols of lksmfs.engine.context, so only
ksm.py imports ksm.py's module; and the engine reads memory only through the source
interface (lksmfs.sources.base), never /proc or the rest of lksmfs directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lksmfs.engine

ENGINE = Path(lksmfs.engine.__file__).parent
ALLOWED_OUTSIDE = ("lksmfs.sources.base",)


def _imports(path: Path) -> set[str]:
    """The lksmfs modules (or packages) `path` imports, by absolute name; a `from P import
    X` names both P and P.X (X may be a module or a name in P)."""
    package = "lksmfs.engine"  # every file here is a module of this package
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "lksmfs" or m.startswith("lksmfs.")}


def _modules() -> dict[str, set[str]]:
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) > 10, files  # the engine's modules are where this test looks
    return {f.stem: _imports(f) for f in files}


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_only_the_facade_imports_the_facade() -> None:
    offenders = {stem: sorted(m for m in mods if _within(m, "lksmfs.engine.ksm"))
                 for stem, mods in _modules().items() if stem != "ksm"}
    assert {s: m for s, m in offenders.items() if m} == {}


def test_the_engine_imports_nothing_of_lksmfs_but_itself_and_the_source_interface() -> None:
    outside = {
        stem: sorted(m for m in mods
                     if not _within(m, "lksmfs.engine") and not any(_within(m, a) for a in ALLOWED_OUTSIDE))
        for stem, mods in _modules().items()
    }
    assert {s: m for s, m in outside.items() if m} == {}


def test_the_checks_see_imports_in_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    """Not vacuous: a lazy or TYPE_CHECKING-only import is found like any other."""
    f = tmp_path / "part.py"
    f.write_text("from typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from lksmfs.engine.ksm import Ksm\n"
                 "def g() -> None:\n    from lksmfs.system import proc\n"
                 "from . import thp\n")
    got = _imports(f)
    assert {"lksmfs.engine.ksm", "lksmfs.system", "lksmfs.system.proc", "lksmfs.engine.thp"} <= got
