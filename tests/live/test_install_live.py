"""`pip install` as a user does it, away from the clone: a wheel built from the committed
files, installed (not editable) into a fresh venv, gives every file the README uses,
`lksmfs share` finds them, and the installed workload runs.  One install: slow (pip
fetches the dependencies from the configured index or its cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testkit.tree import tracked_tree

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    "README.md", "config/lksmfs.yaml", "config/workloads/small.yaml", "config/workloads/tizen-tv.yaml",
    "config/workloads/tv-idle.yaml",
    "docs/fuse.md", "docs/spec.md", "scripts/resourced-emu.sh", "systemd/lksmfs.service",
    "docs/compare-tizen-tv.png",  # the README's comparison plot
    "config/grafana/lksmfs-grafana.json",  # the README's dashboard
}


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)  # type: ignore[call-overload]


def _committed_tree(dest: Path) -> Path:
    """The files git tracks (symlinks as symlinks), without the worktree's .venv/build."""
    return tracked_tree(REPO, dest)


def test_wheel_install_ships_what_the_readme_uses(tmp_path: Path) -> None:
    src = _committed_tree(tmp_path / "src")
    assert (src / "lksmfs/data/config").is_symlink()  # one copy in the repository
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)])
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("lksmfs-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"lksmfs/data/{rel}" for rel in SHIPPED} <= names
        # the content, not a link: the same bytes as the repository's file
        assert z.read("lksmfs/data/systemd/lksmfs.service") == (REPO / "systemd/lksmfs.service").read_bytes()
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = _run([str(venv / "bin/pip"), "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    lksmfs = str(venv / "bin/lksmfs")
    site = Path(_run([str(venv / "bin/python"), "-c", "import lksmfs, os; print(os.path.dirname(lksmfs.__file__))"],
                     cwd=tmp_path).stdout.strip())
    assert site.is_relative_to(venv)  # the installed copy, not the clone
    listing = _run([lksmfs, "share"], cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == sorted(str(site / "data" / rel) for rel in SHIPPED)
    for rel in SHIPPED:
        path = site / "data" / rel
        assert not path.is_symlink() and path.read_bytes() == (REPO / rel).read_bytes(), rel
    emu = _run([lksmfs, "share", "resourced-emu.sh"], cwd=tmp_path).stdout.strip()
    assert emu == str(site / "data/scripts/resourced-emu.sh") and os.access(emu, os.X_OK)
    unit = _run([lksmfs, "share", "lksmfs.service"], cwd=tmp_path).stdout.strip()
    # Documentation= names docs that ship (the README's install copies them there)
    uris = [uri for line in Path(unit).read_text().splitlines() if line.startswith("Documentation=")
            for uri in line.removeprefix("Documentation=").split()]
    assert uris and all(u.startswith("file:/usr/local/share/doc/lksmfs/") for u in uris), uris
    assert all((site / "data/docs" / u.rsplit("/", 1)[1]).is_file() for u in uris), uris
    # the installed example config and workload are usable as the README says
    workload = _run([lksmfs, "share", "small.yaml"], cwd=tmp_path).stdout.strip()
    sim = _run([lksmfs, "simulate", workload, "--rounds", "1", "--json"], cwd=tmp_path)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert json.loads(sim.stdout)[-1]["full_scans"] == 3 + 1  # the initial rounds, then one round
    config = _run([str(venv / "bin/python"), "-c",
                   "import sys; from lksmfs.config import load_config; load_config(sys.argv[1])",
                   _run([lksmfs, "share", "lksmfs.yaml"], cwd=tmp_path).stdout.strip()], cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    missing = _run([lksmfs, "share", "lksmfs.conf"], cwd=tmp_path)
    assert missing.returncode == 1 and "no shipped file or directory 'lksmfs.conf'" in missing.stderr
