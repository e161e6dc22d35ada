"""Cgroup rules of lksmfs.system.cgroups that need no real cgroup: state files and walks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lksmfs.system.cgroups import FREEZING, FROZEN, THAWED, parse_state, procs, rmdir, subgroups


@pytest.mark.parametrize(
    ("data", "v2", "want"),
    [
        (b"FROZEN\n", False, FROZEN),
        (b"FREEZING\n", False, FREEZING),  # not frozen yet: some task still runs
        (b"THAWED\n", False, THAWED),
        (b"populated 1\nfrozen 1\n", True, FROZEN),
        (b"populated 1\nfrozen 0\n", True, THAWED),
        (b"populated 0\n", True, THAWED),  # a kernel without cgroup.freeze
    ],
)
def test_parse_state(data: bytes, v2: bool, want: str) -> None:
    assert parse_state(data, v2) == want


def test_walk_and_membership_of_vanishing_groups(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "cgroup.procs").write_text("3\n4\n")
    assert sorted(subgroups(str(tmp_path))) == [str(tmp_path / p) for p in ("a", "a/b", "c")]
    assert procs(str(tmp_path / "a")) == [3, 4]
    assert procs(str(tmp_path / "gone")) == [] and subgroups(str(tmp_path / "gone")) == []


def test_rmdir_leaves_a_non_empty_group(tmp_path: Path) -> None:
    (tmp_path / "g" / "sub").mkdir(parents=True)
    assert not rmdir(str(tmp_path / "g"), timeout=0.1)  # ENOTEMPTY: not retried
    assert rmdir(str(tmp_path / "g" / "sub")) and rmdir(str(tmp_path / "g"))
    assert rmdir(str(tmp_path / "g"))  # already gone
