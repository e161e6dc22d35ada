"""A cgroup2-only view of this machine, for one command: what Debian 12, Ubuntu 22.04+
and Fedora look like (cgroup2 at /sys/fs/cgroup, no v1 freezer), on a hybrid host.

`command(argv)` wraps argv in `unshare --mount --propagation private` and, inside that
private mount namespace, covers /sys/fs/cgroup with a tmpfs (hiding the v1 hierarchies
and /sys/fs/cgroup/unified) and mounts cgroup2 there.  cgroup2 has one hierarchy per
cgroup namespace, so the view shows the host's own cgroup2 tree: a group made at
/sys/fs/cgroup/NAME inside is /sys/fs/cgroup/unified/NAME outside (`view_group` maps one to the other).
Nothing propagates out, and the mounts vanish with the namespace's last process; groups
are the caller's to remove.  Another process reaches the view through
/proc/PID/root/... of a process inside (`Inside`), FUSE mounts made there included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lksmfs.system import cgroups

VIEW_ROOT = "/sys/fs/cgroup"
COVER = f"mount -t tmpfs -o mode=0755 lksmfs-cgroup2-only {VIEW_ROOT}"
MOUNT_CGROUP2 = f"mount -t cgroup2 cgroup2 {VIEW_ROOT}"


def host_root() -> str | None:
    """This machine's cgroup2 mount, seen from outside the view."""
    v2 = cgroups.discover()[1]
    return v2[0] if v2 else None


def unavailable() -> str | None:
    """Why a cgroup2-only view cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, mounts)"
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    if host_root() is None:
        return "no cgroup2 mounted"
    return None


def command(argv: list[str], *, cgroup2: bool = True) -> list[str]:
    """argv run in a fresh cgroup2-only view (unshare execs: the pid is argv's); with
    `cgroup2` False, a view with no cgroup at all (an empty tmpfs at /sys/fs/cgroup)."""
    setup = " && ".join([COVER, *([MOUNT_CGROUP2] if cgroup2 else []), 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", *argv]


def view_group(host_group: str) -> str:
    """Where a group of the host's cgroup2 tree is inside the view."""
    root = host_root()
    assert root is not None
    return os.path.join(VIEW_ROOT, os.path.relpath(host_group, root))


class Inside:
    """Paths of the view, reached from outside through a process living in it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __call__(self, path: str | Path) -> Path:
        return Path(f"/proc/{self.pid}/root{os.path.abspath(path)}")
