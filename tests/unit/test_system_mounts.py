"""mountinfo (lksmfs.system.mounts) and cgroup discovery from it, on handcrafted files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from lksmfs.system.cgroups import discover, visible
from lksmfs.system.mounts import is_mountpoint, parse_mountinfo, read_mountinfo, unescape


def _mangle(path: bytes) -> bytes:
    """What fs/proc_namespace.c's mangle() writes: space, tab, newline, backslash and '#'
    as a backslash and three octal digits; every other byte raw (UTF-8 included)."""
    return b"".join(b"\\%03o" % c if c in b" \t\n\\#" else bytes([c]) for c in path)


def test_unescape_octal_as_bytes_then_decode() -> None:
    assert unescape(b"/mnt/a\\040b\\011c\\134d\\043e") == "/mnt/a b\tc\\d#e"
    # UTF-8 is raw in mountinfo: it must come back as the same characters
    assert unescape("/mnt/été à\\040la mer".encode()) == "/mnt/été à la mer"
    # not valid UTF-8: decoded like os decodes file names, so it compares equal to them
    assert unescape(b"/mnt/x\\377\xfe") == os.fsdecode(b"/mnt/x\xff\xfe")


def test_parse_fields_around_optional_ones() -> None:
    text = (b"36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:7 - ext3 /dev/root "
            b"rw,errors=continue\n"
            b"garbage line without separator\n"
            b"41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    a, b = parse_mountinfo(text)
    assert (a.device, a.root, a.mountpoint, a.fstype, a.source) == (
        "98:0", "/mnt1", "/mnt/with space", "ext3", "/dev/root")
    assert a.super_options == ("rw", "errors=continue")
    assert (b.mountpoint, b.fstype, b.super_options) == ("/sys/fs/cgroup", "cgroup2", ("rw", "nsdelegate"))


def test_is_mountpoint_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    """A mountpoint named with spaces, a tab, a backslash, non-ASCII letters and a byte
    that is not UTF-8 is recognised, and only at its exact path."""
    names = ["été à la mer", "tab\there", "back\\slash #1", os.fsdecode(b"raw\xff")]
    info = []
    for i, name in enumerate(names):
        d = tmp_path / name
        d.mkdir()
        info.append(b"%d 1 0:%d / %s rw - fuse.lksmfs lksmfs rw\n" % (100 + i, 90 + i,
                                                                      _mangle(os.fsencode(d))))
    mi = tmp_path / "mountinfo"
    mi.write_bytes(b"".join(info))
    for name in names:
        assert is_mountpoint(str(tmp_path / name), str(mi)), name
    assert not is_mountpoint(str(tmp_path), str(mi))
    (tmp_path / "été").mkdir()
    assert not is_mountpoint(str(tmp_path / "été"), str(mi))  # a prefix is not the mount


def test_discover_roots_from_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "22 1 0:20 / /proc rw - proc proc rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "37 31 0:34 / /sys/fs/cgroup/cpu,freezer rw shared:9 - cgroup cgroup rw,cpu,freezer\n"
        "90 31 0:34 / /mnt/again rw - cgroup cgroup rw,cpu,freezer\n"  # bind: same hierarchy
        "41 31 0:38 / /sys/fs/cgroup/my\\040unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    v1, v2 = discover(str(mi), is_visible=lambda m: True)
    assert v1 == ["/sys/fs/cgroup/cpu,freezer"]
    assert v2 == ["/sys/fs/cgroup/my unified"]
    assert discover(str(tmp_path / "missing")) == ([], [])


def test_discover_skips_covered_mounts(tmp_path: Path) -> None:
    """A cgroup2-only view made over a hybrid one: a tmpfs covers /sys/fs/cgroup and the
    same cgroup2 hierarchy (0:38) is mounted again at /sys/fs/cgroup.  The covered
    mounts are still listed; the hierarchy is found where it can be reached."""
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "90 31 0:90 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "91 90 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    covered = {"/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified"}  # stat() fails there
    assert discover(str(mi), is_visible=lambda m: m.mountpoint not in covered) == ([], ["/sys/fs/cgroup"])
    # without the visibility check the covered mounts would win (the old behaviour)
    assert discover(str(mi), is_visible=lambda m: True) == (["/sys/fs/cgroup/freezer"], ["/sys/fs/cgroup/unified"])


def test_visible_compares_the_mountpoint_with_the_mounts_device() -> None:
    """This process's own /proc is what /proc shows; the same line with another device
    (a mount covered since) or a path that is gone is not."""
    proc = [m for m in read_mountinfo() if m.mountpoint == "/proc"][-1]
    assert visible(proc)
    assert not visible(replace(proc, device="0:0"))
    assert not visible(replace(proc, mountpoint="/proc/no such dir"))
