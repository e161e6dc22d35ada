"""Cgroups as far as freezing goes: the v1 freezer and cgroup2, side by side.

- v1 freezer (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst): write FROZEN or
  THAWED to `freezer.state`, which reads FREEZING until every task is frozen.
- cgroup2 (Documentation/admin-guide/cgroup-v2.rst): write 1 or 0 to `cgroup.freeze`;
  `cgroup.events` says `frozen 1` once every task is frozen (kernfs notifies IN_MODIFY).

Both have `cgroup.procs` (the thread-group ids of a group, writable to move a process),
and a group is a directory removed with rmdir once empty.  Functions take the group's
path and whether it is cgroup2 (`v2`); `Freezer` is a subtree lksmfs creates and removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lksmfs.system.mounts import MOUNTINFO, Mount, read_mountinfo
from lksmfs.system.waiting import wait_until

# The v1 freezer hierarchy's usual place (systemd's hybrid layout); the code finds
# hierarchies in mountinfo (discover()), this name is for messages and tests.
V1_FREEZER = "/sys/fs/cgroup/freezer"

FROZEN = "FROZEN"
FREEZING = "FREEZING"  # v1 only: freezing in progress
THAWED = "THAWED"


class CgroupError(OSError):
    pass


# -------------------------------------------------------------------------- hierarchies


def visible(m: Mount) -> bool:
    """Is mount `m` what its mountpoint shows now?  A mount covered by a later one (a
    tmpfs over /sys/fs/cgroup, say) stays listed in mountinfo but cannot be reached: its
    path is gone or leads to another file system."""
    major, _, minor = m.device.partition(":")
    try:
        return os.stat(m.mountpoint).st_dev == os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return False


def discover(mountinfo: str = MOUNTINFO, *, is_visible: Callable[[Mount], bool] = visible
             ) -> tuple[list[str], list[str]]:
    """(v1 freezer mount points, cgroup2 mount points) from mountinfo, one per hierarchy
    (bind mounts of a hierarchy share its device number), leaving out mounts that others
    cover (`is_visible`); ([], []) if mountinfo is unreadable."""
    v1: list[str] = []
    v2: list[str] = []
    seen: set[str] = set()
    try:
        mounts = read_mountinfo(mountinfo)
    except OSError:
        return v1, v2
    for m in mounts:
        freezer = m.fstype == "cgroup" and "freezer" in m.super_options
        if (freezer or m.fstype == "cgroup2") and m.device not in seen and is_visible(m):
            (v1 if freezer else v2).append(m.mountpoint)
            seen.add(m.device)
    return v1, v2


def hierarchy_of(path: str, mountinfo: str = MOUNTINFO) -> bool | None:
    """Is `path` in a cgroup2 hierarchy (True), a v1 freezer hierarchy (False), or
    neither (None)?  Decided by the visible mount it lies on, not by file names."""
    real = os.path.realpath(path)
    best: Mount | None = None
    try:
        mounts = read_mountinfo(mountinfo)
    except OSError:
        return None
    for m in mounts:
        inside = real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(m.mountpoint) >= len(best.mountpoint)) and visible(m):
            best = m
    if best is None:
        return None
    if best.fstype == "cgroup2":
        return True
    if best.fstype == "cgroup" and "freezer" in best.super_options:
        return False
    return None


def is_v2(path: str) -> bool:
    """A cgroup2 group (the root included)?"""
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def is_v1_freezer(path: str) -> bool:
    """A group of a v1 freezer hierarchy (the root has `tasks` but no freezer.state)?"""
    return os.path.exists(os.path.join(path, "tasks")) and (
        os.path.exists(os.path.join(path, "freezer.state"))
        or os.path.basename(os.path.realpath(path)) == "freezer"
        or "freezer" in path.split(os.sep)
    )


def default_hierarchy(mountinfo: str = MOUNTINFO) -> tuple[str, bool]:
    """(root, is cgroup2) where new groups go when nobody says: the first cgroup2 mount
    in mountinfo, else the first v1 freezer; CgroupError when the machine has neither."""
    v1, v2 = discover(mountinfo)
    if v2:
        return v2[0], True
    if v1:
        return v1[0], False
    raise CgroupError(errno.ENOENT, f"no cgroup2 and no cgroup v1 freezer mounted ({mountinfo})")


def default_root(name: str) -> str:
    """A group NAME under default_hierarchy()'s root (not created here)."""
    return os.path.join(default_hierarchy()[0], name)


# --------------------------------------------------------------------------- membership


def procs(group: str) -> list[int]:
    """The processes directly in `group` ([] once it is gone)."""
    try:
        with open(os.path.join(group, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def subgroups(root: str) -> list[str]:
    """Every group below `root`, not `root` itself; groups removed mid-walk are skipped."""
    out: list[str] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            out.append(e.path)
                            stack.append(e.path)
                    except OSError:
                        pass
        except OSError:
            pass
    return out


def cgroup_pids(group: str, *, recursive: bool = True) -> set[int]:
    """Processes in `group` and, if `recursive`, in every group below it."""
    out = set(procs(group))
    if recursive:
        for d in subgroups(group):
            out.update(procs(d))
    return out


def attach(group: str, pid: int) -> None:
    """Move process `pid` (all its threads) into `group`."""
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(f"{pid}\n")


# ------------------------------------------------------------------------------ freezing


def state_file(group: str, v2: bool) -> str:
    """The file that reports the freeze state: cgroup.events (v2), freezer.state (v1)."""
    return os.path.join(group, "cgroup.events" if v2 else "freezer.state")


def parse_state(data: bytes, v2: bool) -> str:
    """FROZEN, FREEZING (v1) or THAWED from the state file's text."""
    if v2:
        for line in data.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"frozen":
                return FROZEN if value.strip() == b"1" else THAWED
        return THAWED
    text = data.strip().decode("ascii", "replace")
    return text if text in (FROZEN, FREEZING) else THAWED


def read_state(group: str, v2: bool) -> str:
    with open(state_file(group, v2), "rb") as f:
        return parse_state(f.read(), v2)


def request(group: str, v2: bool, frozen: bool) -> None:
    """Ask the kernel to freeze or thaw `group` (it gets there asynchronously)."""
    if v2:
        path, value = os.path.join(group, "cgroup.freeze"), "1" if frozen else "0"
    else:
        path, value = os.path.join(group, "freezer.state"), FROZEN if frozen else THAWED
    with open(path, "w") as f:
        f.write(value)


def freeze(group: str, v2: bool, timeout: float = 10.0) -> None:
    """Freeze `group`; return once the kernel reports every task frozen (TimeoutError)."""
    request(group, v2, True)
    wait_until(lambda: read_state(group, v2) == FROZEN, timeout, 0.001, max_interval=0.05,
               what=f"{group} to be frozen")


def thaw(group: str, v2: bool, timeout: float = 10.0) -> None:
    """Thaw `group`; return once the kernel reports it thawed (TimeoutError)."""
    request(group, v2, False)
    wait_until(lambda: read_state(group, v2) == THAWED, timeout, 0.001, max_interval=0.05,
               what=f"{group} to be thawed")


def thaw_quietly(group: str) -> None:
    """Ask a group of either hierarchy to thaw, if it still exists; for cleanup paths,
    where nothing may raise (frozen v1 tasks cannot die, and a gone group is fine)."""
    with contextlib.suppress(OSError):
        request(group, is_v2(group), False)


# ------------------------------------------------------------------------------ removal


def rmdir(group: str, timeout: float = 10.0) -> bool:
    """Remove an empty group; EBUSY (a reaped task still on its way out) is retried until
    `timeout`.  True once it is gone, False if it still holds tasks or subgroups."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(group)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def remove_tree(group: str, v2: bool, evacuate_to: str, timeout: float = 10.0) -> list[str]:
    """Remove `group` and everything below it, whoever is inside: thaw every group and
    wait for it (a v1-frozen task cannot move or die), move its processes to
    `evacuate_to`, rmdir deepest first.  Returns the groups that could not be removed."""
    if not os.path.isdir(group):
        return []
    groups = [group, *subgroups(group)]
    for g in groups:
        with contextlib.suppress(OSError):  # a group removed meanwhile, or stuck
            thaw(g, v2, timeout)
    left = []
    for g in sorted(groups, key=lambda p: p.count(os.sep), reverse=True):
        for pid in procs(g):
            with contextlib.suppress(OSError):
                attach(evacuate_to, pid)
        if not rmdir(g, timeout):
            left.append(g)
    return left


@dataclass
class Freezer:
    """A subtree of freezer cgroups we own: create groups, move processes in, freeze,
    thaw, remove what we created (and only that: others may share the root)."""

    root: str
    v2: bool
    _made: list[str] = field(default_factory=list)  # groups we created, parents first

    @property
    def version(self) -> int:
        return 2 if self.v2 else 1

    @classmethod
    def open(cls, root: str) -> Freezer:
        """Our subtree at `root`, of the hierarchy its parent belongs to."""
        root = os.path.abspath(root.rstrip("/"))
        parent = os.path.dirname(root)
        if is_v2(parent):
            return cls(root, True)
        if is_v1_freezer(parent):
            return cls(root, False)
        raise CgroupError(errno.ENOTDIR, f"{parent} is neither a cgroup v2 nor a v1 freezer group")

    def group(self, *parts: str) -> str:
        """Create (if needed) ROOT/parts... and return its path."""
        path = self.root
        for p in ("", *parts):
            path = os.path.join(path, p) if p else path
            if not os.path.isdir(path):
                os.mkdir(path)
                self._made.append(path)
        if self.v2 and not os.path.exists(os.path.join(path, "cgroup.freeze")):
            raise CgroupError(errno.ENOTSUP, f"{path}: no cgroup.freeze (kernel < 5.2?)")
        return path

    def add(self, group: str, pid: int) -> None:
        attach(group, pid)

    def procs(self, group: str) -> list[int]:
        return procs(group)

    def is_frozen(self, group: str) -> bool:
        return read_state(group, self.v2) == FROZEN

    def freeze(self, group: str, timeout: float = 10.0) -> None:
        freeze(group, self.v2, timeout)

    def thaw(self, group: str, timeout: float = 10.0) -> None:
        thaw(group, self.v2, timeout)

    def remove_all(self, timeout: float = 10.0) -> list[str]:
        """rmdir every group we created, deepest first; returns those that could not be
        removed.  Groups holding tasks, or groups of others below ours, are left alone."""
        left: list[str] = []
        for path in sorted(set(self._made), key=lambda p: p.count(os.sep), reverse=True):
            if subgroups(path) or not rmdir(path, timeout):  # someone else's groups below
                left.append(path)
        self._made = [p for p in self._made if p in left]
        return left
