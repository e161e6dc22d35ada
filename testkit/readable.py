"""lksmfs as another user runs it: a copy any user may read, made by the test, removed after.

A checkout may sit where only root can go (a clone under /root, mode 0700, or in a
`mktemp -d` directory): an unprivileged user cannot reach its venv, its package or
testkit/memchild.py there.  `readable_install()` copies the package, the distributions it
requires (each file their RECORD lists; hard links where the file system allows) and
memchild.py into a 0755 directory under /tmp, and finds an interpreter of the same
Python version that any user may run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution, requires
from pathlib import Path

from testkit import REPO
from testkit.mount import public_tmpdir

__all__ = ["ReadableInstall", "others_may_run", "readable_install"]


def others_may_run(path: str | Path) -> bool:
    """Can any user execute `path`: every directory on the way searchable, the file
    executable, by others (what root's os.access cannot tell)."""
    p = Path(os.path.realpath(path))
    try:
        if not p.stat().st_mode & 0o001:
            return False
        return all(d.stat().st_mode & 0o001 for d in p.parents)
    except OSError:
        return False


def _same_version(python: str) -> bool:
    r = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                       text=True, check=False)
    return r.returncode == 0 and r.stdout.split() == [str(v) for v in sys.version_info[:2]]


def shared_python() -> str | None:
    """An interpreter of this Python version that any user may run, or None."""
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "",
                  f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for c in candidates:
        if c and others_may_run(c) and _same_version(c):
            return os.path.realpath(c)
    return None


def _copy(src: Path, dst: Path) -> None:
    """A hard link where possible (same file system, cheap), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    os.chmod(dst, os.stat(dst).st_mode | 0o444)


@dataclass(frozen=True)
class ReadableInstall:
    """Where the copy is: run `[*python, "-m", "lksmfs.cli", ...]` with `env`, in `root`."""

    root: Path
    python: list[str]
    env: dict[str, str]
    memchild: Path


@contextlib.contextmanager
def readable_install() -> Iterator[ReadableInstall]:
    """lksmfs, its requirements and memchild.py in a directory every user may read;
    removed afterwards.  Skips (with the reason) when no interpreter of this version is
    runnable by every user."""
    import pytest

    python = shared_python()
    if python is None:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that every user may run")
    with public_tmpdir() as root:
        site = root / "site"
        shutil.copytree(REPO / "lksmfs", site / "lksmfs", ignore=shutil.ignore_patterns("__pycache__"))
        meta = distribution("lksmfs")
        info = site / f"lksmfs-{meta.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(meta.read_text("METADATA") or "")
        for req in requires("lksmfs") or []:
            if "extra ==" in req:
                continue
            dist = distribution(re.split(r"[<>=!~; \[]", req, maxsplit=1)[0])
            for f in dist.files or []:
                if f.parts[0] == ".." or "__pycache__" in f.parts:
                    continue
                _copy(Path(str(dist.locate_file(f))), site / f)
        memchild = root / "memchild.py"
        _copy(REPO / "testkit" / "memchild.py", memchild)
        for d in [site, *site.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
        yield ReadableInstall(root, [python, "-s"], env, memchild)
