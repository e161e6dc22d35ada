"""Freezer cgroups for spawned workloads: v2 `cgroup.freeze` if available, else v1 freezer.

Each instance gets its own leaf group ROOT/APP/K, so an app (every leaf under ROOT/APP)
and a single instance freeze the same way and a thaw of one instance is never blocked by
a frozen parent.  Waiting is on the kernel's own report (v2 `cgroup.events` `frozen 1`,
v1 `freezer.state` FROZEN), with a deadline: never sleep-and-hope.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

V2_MOUNTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
V1_FREEZER = "/sys/fs/cgroup/freezer"
ROOT_NAME = "lksmfs-workload"


class CgroupError(OSError):
    pass


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _is_v2(dirpath: str) -> bool:
    return os.path.exists(os.path.join(dirpath, "cgroup.controllers"))


def _is_v1_freezer(dirpath: str) -> bool:
    return os.path.exists(os.path.join(dirpath, "tasks")) and (
        os.path.exists(os.path.join(dirpath, "freezer.state"))
        or os.path.basename(os.path.realpath(dirpath)) == "freezer"
        or "freezer" in dirpath.split(os.sep)
    )


def _has_subgroups(path: str) -> bool:
    try:
        return any(e.is_dir() for e in os.scandir(path))
    except FileNotFoundError:
        return False


class Freezer:
    """A cgroup subtree we own: create groups, move pids in, freeze, thaw, remove."""

    def __init__(self, root: str, version: int) -> None:
        self.root = root
        self.version = version
        self._made: list[str] = []  # groups we created, parents first

    @classmethod
    def open(cls, root: str | None = None) -> Freezer:
        """Our root group: `root` if given (v1 or v2 found from its parent), else
        lksmfs-workload under the first v2 hierarchy, else under the v1 freezer."""
        if root is not None:
            parent = os.path.dirname(os.path.abspath(root.rstrip("/")))
            if _is_v2(parent):
                return cls(os.path.abspath(root), 2)
            if _is_v1_freezer(parent):
                return cls(os.path.abspath(root), 1)
            raise CgroupError(errno.ENOTDIR, f"{parent} is neither a cgroup v2 nor a v1 freezer "
                                             "group")
        for mnt in V2_MOUNTS:
            if _is_v2(mnt):
                return cls(os.path.join(mnt, ROOT_NAME), 2)
        if os.path.exists(os.path.join(V1_FREEZER, "tasks")):
            return cls(os.path.join(V1_FREEZER, ROOT_NAME), 1)
        raise CgroupError(errno.ENOENT, "no cgroup v2 hierarchy and no v1 freezer")

    def group(self, *parts: str) -> str:
        """Create (if needed) ROOT/parts... and return its path."""
        path = self.root
        for p in ("", *parts):
            path = os.path.join(path, p) if p else path
            if not os.path.isdir(path):
                os.mkdir(path)
                self._made.append(path)
        if self.version == 2 and not os.path.exists(os.path.join(path, "cgroup.freeze")):
            raise CgroupError(errno.ENOTSUP, f"{path}: no cgroup.freeze (kernel < 5.2?)")
        return path

    def add(self, path: str, pid: int) -> None:
        _write(os.path.join(path, "cgroup.procs" if self.version == 2 else "tasks"), f"{pid}\n")

    def procs(self, path: str) -> list[int]:
        try:
            text = _read(os.path.join(path, "cgroup.procs"))
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def is_frozen(self, path: str) -> bool:
        if self.version == 2:
            for line in _read(os.path.join(path, "cgroup.events")).splitlines():
                key, _, value = line.partition(" ")
                if key == "frozen":
                    return value.strip() == "1"
            return False
        return _read(os.path.join(path, "freezer.state")).strip() == "FROZEN"

    def is_thawed(self, path: str) -> bool:
        if self.version == 2:
            return not self.is_frozen(path)
        return _read(os.path.join(path, "freezer.state")).strip() == "THAWED"

    def freeze(self, path: str, timeout: float = 10.0) -> None:
        """Freeze the group and return once the kernel reports every task frozen."""
        if self.version == 2:
            _write(os.path.join(path, "cgroup.freeze"), "1")
        else:
            _write(os.path.join(path, "freezer.state"), "FROZEN")
        self._wait(path, self.is_frozen, timeout, "frozen")

    def thaw(self, path: str, timeout: float = 10.0) -> None:
        if self.version == 2:
            _write(os.path.join(path, "cgroup.freeze"), "0")
        else:
            _write(os.path.join(path, "freezer.state"), "THAWED")
        self._wait(path, self.is_thawed, timeout, "thawed")

    def _wait(self, path: str, cond: Callable[[str], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not cond(path):
            if time.monotonic() > deadline:
                raise CgroupError(errno.ETIMEDOUT, f"{path}: not {what} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def remove_all(self, timeout: float = 10.0) -> list[str]:
        """rmdir every group we created (deepest first) and our root if empty; returns the
        groups that could not be removed.  Groups still holding tasks are left alone."""
        left: list[str] = []
        for path in sorted(set(self._made), key=lambda p: p.count(os.sep), reverse=True):
            deadline = time.monotonic() + timeout
            while True:
                if _has_subgroups(path):  # someone else's groups (a concurrent spawn)
                    left.append(path)
                    break
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: a reaped task may still be on its way out of the group
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        left.append(path)
                        break
                    time.sleep(0.01)
        self._made = [p for p in self._made if p in left]
        return left
