"""`lksmfs share`: names to paths, and a clone's lksmfs/data pointing at the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lksmfs.cli import main
from lksmfs.commands.share import DATA, find, locate, shipped

REPO = Path(__file__).resolve().parents[2]
# every file the README tells a user to run, copy or read
README_FILES = {
    "README.md", "config/lksmfs.yaml", "config/workloads/small.yaml", "config/workloads/tizen-tv.yaml",
    "config/workloads/tv-idle.yaml",
    "docs/fuse.md", "docs/spec.md", "scripts/resourced-emu.sh", "systemd/lksmfs.service",
    "docs/compare-tizen-tv.png",  # the README's comparison plot
    "config/grafana/lksmfs-grafana.json",  # the README's dashboard
}


def test_a_clone_ships_the_repository_files_themselves() -> None:
    assert set(shipped()) == README_FILES
    for rel in README_FILES:  # the same file, not a copy
        assert os.path.samefile(DATA / rel, REPO / rel), rel


def test_names_resolve_by_path_basename_or_directory(tmp_path: Path) -> None:
    for rel in ("a/x.yaml", "a/b/y.yaml", "c/y.yaml", "z.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert find("x.yaml", tmp_path) == ["a/x.yaml"]
    assert find("b", tmp_path) == ["a/b"]
    assert find("c/y.yaml", tmp_path) == ["c/y.yaml"]
    assert locate("z.md", tmp_path) == tmp_path / "z.md"
    with pytest.raises(LookupError, match=r"'y.yaml' is ambiguous: a/b/y.yaml, c/y.yaml"):
        locate("y.yaml", tmp_path)
    with pytest.raises(LookupError, match=r"no shipped file or directory 'w.md'; shipped: a/b/y.yaml, a/x.yaml"):
        locate("w.md", tmp_path)


def test_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["share", "tizen-tv.yaml"]) == 0
    assert capsys.readouterr().out == f"{REPO}/config/workloads/tizen-tv.yaml\n"
    assert main(["share", "workloads"]) == 0
    assert capsys.readouterr().out == f"{REPO}/config/workloads\n"
    assert main(["share"]) == 0
    assert capsys.readouterr().out.splitlines() == sorted(f"{REPO}/{rel}" for rel in README_FILES)
    assert main(["share", "lksmfs.conf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lksmfs share: no shipped file or directory 'lksmfs.conf'; shipped: README.md,")
