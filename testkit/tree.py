"""A copy of the repository as a fresh clone has it: the files git tracks (and new ones
not ignored yet), without the worktree's .venv, build output or caches."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def tracked_tree(repo: Path, dest: Path) -> Path:
    """Copy `repo`'s tracked files (symlinks as symlinks) to `dest`; skips the calling test
    when there is no git or no checkout."""
    import pytest

    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the committed files")
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    for rel in filter(None, r.stdout.split("\0")):
        src, dst = repo / rel, dest / rel
        if not os.path.lexists(src):
            continue  # deleted in the worktree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest
