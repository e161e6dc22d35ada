"""Mounts: /proc/self/mountinfo read right, and the one lazy unmount of a FUSE mount.

mountinfo (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE
SOURCE SUPER_OPTIONS`.  The kernel writes paths as raw bytes except for the characters
fs/proc_namespace.c's mangle() escapes as a backslash and three octal digits (space, tab,
newline, backslash, '#'), so a field is unescaped as bytes and then decoded the way os
decodes file names: a mountpoint with spaces or non-ASCII characters compares equal to
the path the user gave.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from lksmfs.system.proc import PROC_ROOT

MOUNTINFO = f"{PROC_ROOT}/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")
# fuse3's, fuse2's, then util-linux's: whichever the machine has (-z / -l: detach now,
# even while busy or dead, and let the kernel finish when the last user leaves)
UNMOUNT_COMMANDS = (("fusermount3", "-uz"), ("fusermount", "-uz"), ("umount", "-l"))


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (the fields lksmfs uses)."""

    device: str  # MAJ:MIN: equal for bind mounts of the same file system or hierarchy
    root: str
    mountpoint: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


def unescape(field: bytes) -> str:
    """Undo mangle()'s \\ooo escapes, then decode like a file name (surrogateescape)."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), field))


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Every well-formed line of a mountinfo text, in order."""
    out: list[Mount] = []
    for line in data.splitlines():
        pre, sep, post = line.partition(b" - ")
        if not sep:
            continue
        a = pre.split(b" ")
        b = post.split(b" ")
        if len(a) < 6 or len(b) < 3:
            continue
        out.append(Mount(
            device=a[2].decode("ascii", "replace"),
            root=unescape(a[3]),
            mountpoint=unescape(a[4]),
            fstype=unescape(b[0]),
            source=unescape(b[1]),
            super_options=tuple(unescape(b[2]).split(",")),
        ))
    return out


def read_mountinfo(path: str = MOUNTINFO) -> list[Mount]:
    """The mounts of this process's mount namespace (OSError if unreadable)."""
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def is_mountpoint(path: str, mountinfo: str = MOUNTINFO) -> bool:
    """Is something mounted exactly at `path` (a dead FUSE mount included)?"""
    real = os.path.realpath(path)
    return any(m.mountpoint == real for m in read_mountinfo(mountinfo))


def lazy_unmount(path: str, timeout: float = 10.0) -> bool:
    """Detach whatever is mounted at `path` (a dead FUSE mount answers only ENOTCONN):
    fusermount3 -uz, else fusermount -uz, else umount -l.  True once nothing is mounted
    there any more."""
    for cmd in UNMOUNT_COMMANDS:
        if not is_mountpoint(path):
            return True
        try:
            subprocess.run([*cmd, path], capture_output=True, check=False, timeout=timeout)
        except (OSError, subprocess.SubprocessError):  # not installed, or hung
            continue
    return not is_mountpoint(path)
