"""Scope rules on fake cgroup directories and a fake /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from lksmfs.sources.scope import Scope
from lksmfs.system.cgroups import cgroup_pids
from lksmfs.system.proc import read_comm


@pytest.fixture
def cg(tmp_path: Path) -> Path:
    """app1 (10, 11) with a child cgroup sub (12); app2 (20); empty (none)."""
    root = tmp_path / "cg"
    (root / "app1" / "sub").mkdir(parents=True)
    (root / "app2").mkdir()
    (root / "empty").mkdir()
    (root / "app1" / "cgroup.procs").write_text("10\n11\n")
    (root / "app1" / "sub" / "cgroup.procs").write_text("12\n")
    (root / "app2" / "cgroup.procs").write_text("20\n")
    (root / "empty" / "cgroup.procs").write_text("")
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    p = tmp_path / "proc"
    for pid, comm in ((10, "web"), (11, "worker"), (12, "helper"), (20, "db"), (30, "cron")):
        (p / str(pid)).mkdir(parents=True)
        (p / str(pid) / "comm").write_text(comm + "\n")
    return p


def test_empty_scope_allows_everything() -> None:
    s = Scope()
    assert s.unrestricted
    assert s.members() is None
    assert s.allows(1, "init") and s.allows(77, "anything")


def test_pids_only() -> None:
    s = Scope(pids={5, 6})
    assert s.allows(5, "a") and s.allows(6, "b")
    assert not s.allows(7, "a")


def test_cgroup_includes_descendants(cg: Path) -> None:
    s = Scope(cgroups=[str(cg / "app1")])
    assert s.members() == frozenset({10, 11, 12})
    assert not s.allows(20, "db")
    assert cgroup_pids(str(cg / "app1"), recursive=False) == {10, 11}


def test_pids_and_cgroups_are_a_union(cg: Path) -> None:
    s = Scope(pids={30}, cgroups=[str(cg / "app2")])
    assert s.members() == frozenset({20, 30})


def test_exclude_comms_after_inclusion(cg: Path) -> None:
    s = Scope(cgroups=[str(cg / "app1")], exclude_comms={"worker"})
    assert s.allows(10, "web")
    assert not s.allows(11, "worker")
    assert not s.allows(30, "cron")  # not included in the first place
    only_excl = Scope(exclude_comms={"cron"})
    assert only_excl.members() is None
    assert only_excl.allows(999, "x") and not only_excl.allows(30, "cron")


def test_missing_or_vanishing_cgroup_contributes_nothing(cg: Path) -> None:
    s = Scope(pids={1}, cgroups=[str(cg / "nope"), str(cg / "empty")])
    assert s.members() == frozenset({1})
    assert cgroup_pids(str(cg / "nope")) == set()


def test_snapshot_reads_membership_once(cg: Path) -> None:
    s = Scope(cgroups=[str(cg / "app2")])
    snap = s.snapshot()
    (cg / "app2" / "cgroup.procs").write_text("20\n21\n")
    assert not snap.allows(21, "new")
    assert s.snapshot().allows(21, "new")


def test_allows_pid_reads_comm(proc: Path, cg: Path) -> None:
    s = Scope(cgroups=[str(cg / "app1")], exclude_comms={"helper"})
    assert s.allows_pid(10, str(proc))
    assert not s.allows_pid(12, str(proc))  # comm "helper" read from the fake /proc
    assert not s.allows_pid(30, str(proc))
    assert not Scope(exclude_comms={"x"}).allows_pid(4242, str(proc))  # gone pid
    assert Scope().allows_pid(4242, str(proc))  # unrestricted: no need to look
    assert read_comm(20, str(proc)) == "db"
    assert read_comm(4242, str(proc)) is None
