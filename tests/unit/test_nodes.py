"""kernfs's metadata rules (lksmfs.sysfs.nodes) without FUSE, and the owner of a
process's figures read from the real /proc."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from lksmfs.sysfs.nodes import UTIME_NOW, UTIME_OMIT, NodeAttrs, check_open, process_owner
from lksmfs.system.proc import task_id


def test_untouched_node_has_the_mount_time_and_the_given_owner() -> None:
    n = NodeAttrs(123)
    assert n.stat("/run", 0o644, (5, 6)) == {
        "perm": 0o644, "st_uid": 5, "st_gid": 6, "st_atime": 123, "st_mtime": 123, "st_ctime": 123}
    assert n.mode("/run", 0o644) == 0o644


def test_first_change_sets_every_time_then_only_what_changed() -> None:
    """__kernfs_iattrs() starts the three times at now; chmod then moves only ctime."""
    n = NodeAttrs(123)
    n.chmod("/run", 0o104600)  # type bits are not the mode's business
    st = n.stat("/run", 0o644)
    assert st["perm"] == 0o4600 and st["st_atime"] == st["st_mtime"] > 123
    n.utimens("/run", (UTIME_OMIT, 7 * 10**9))
    st2 = n.stat("/run", 0o644)
    assert (st2["st_atime"], st2["st_mtime"]) == (st["st_atime"], 7 * 10**9)
    assert st2["st_ctime"] >= st["st_ctime"]
    n.utimens("/run", (UTIME_NOW, UTIME_OMIT))
    assert n.stat("/run", 0o644)["st_atime"] >= st2["st_ctime"]
    n.chown("/run", -1, 9)
    assert (n.stat("/run", 0o644)["st_uid"], n.stat("/run", 0o644)["st_gid"]) == (0, 9)


@pytest.mark.parametrize(
    ("mode", "acc", "can_read", "can_write", "ok"),
    [(0o644, os.O_RDONLY, True, True, True), (0o644, os.O_WRONLY, True, True, True),
     (0o444, os.O_WRONLY, True, False, False), (0o666, os.O_WRONLY, True, False, False),
     (0o000, os.O_RDONLY, True, True, False), (0o200, os.O_RDWR, False, True, False),
     (0o200, os.O_WRONLY, False, True, True), (0o020, os.O_WRONLY, True, True, True)],
)
def test_check_open(mode: int, acc: int, can_read: bool, can_write: bool, ok: bool) -> None:
    if ok:
        check_open(mode, acc, can_read=can_read, can_write=can_write)
    else:
        with pytest.raises(OSError) as ei:
            check_open(mode, acc, can_read=can_read, can_write=can_write)
        assert ei.value.errno == errno.EACCES


def test_process_owner_of_a_real_process() -> None:
    """As root the child runs as nobody, so its owner cannot be mistaken for the fallback."""
    ids = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    owner = (65534, 65534) if ids else (os.getuid(), os.getgid())
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, **ids)  # type: ignore[call-overload]
    try:
        start = task_id(p.pid).start_time
        assert process_owner(p.pid, start) == owner
        assert process_owner(p.pid, start + 1) == (0, 0)  # a reused pid is not the process
    finally:
        p.kill()
        p.wait()
    assert process_owner(p.pid, start) == (0, 0)  # gone
