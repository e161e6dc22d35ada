"""What sysfs does with a file's metadata and with its directory, for the FUSE adapter.

Measured as root on /sys/kernel/mm/ksm (kernel 6.18) and read in fs/kernfs:

- chmod, chown and touch succeed and last (kernfs_iop_setattr keeps them in the node's
  kernfs_iattrs, whose times start at "now" when the first change allocates them);
- open checks the node's *current* mode against what the file can do, for root too
  (kernfs_fop_open with KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK): a write needs a w bit and a
  store, a read an r bit and a show, else EACCES;
- rename, unlink, mkdir, rmdir, symlink, link and mknod are EPERM (no syscall_ops, no
  i_op->unlink/symlink/link/mknod), creating a file is EACCES (no i_op->create).

The per-process files follow /proc/PID/ksm_stat instead: 0400, owned by the process's
owner (task_dump_owner), chmod is EPERM (proc_setattr).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from dataclasses import dataclass

from lksmfs.system.proc import PROC_ROOT, TaskId, owner

# libfuse 2's utimens gets these in tv_nsec (with tv_sec 0) for "now" and "leave it"
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

ROOT_OWNER = (0, 0)


@dataclass
class _Iattrs:
    """kernfs_iattrs: what a chmod/chown/touch changed on one node."""

    mode: int | None
    uid: int
    gid: int
    atime: int
    mtime: int
    ctime: int


class NodeAttrs:
    """Mode, owner and times of the mount's nodes, with the changes root made to them."""

    def __init__(self, created_ns: int) -> None:
        self._created = created_ns
        self._changed: dict[str, _Iattrs] = {}
        self._lock = threading.Lock()

    def mode(self, path: str, default: int) -> int:
        ia = self._changed.get(path)
        return default if ia is None or ia.mode is None else ia.mode

    def stat(self, path: str, default_mode: int, owner: tuple[int, int] = ROOT_OWNER) -> dict[str, int]:
        """st_mode permission bits, st_uid/st_gid and the three times (ns) of `path`."""
        ia = self._changed.get(path)
        if ia is None:
            t = self._created
            return {"perm": default_mode, "st_uid": owner[0], "st_gid": owner[1],
                    "st_atime": t, "st_mtime": t, "st_ctime": t}
        return {"perm": default_mode if ia.mode is None else ia.mode, "st_uid": ia.uid,
                "st_gid": ia.gid, "st_atime": ia.atime, "st_mtime": ia.mtime, "st_ctime": ia.ctime}

    def _iattrs(self, path: str) -> _Iattrs:
        """__kernfs_iattrs(): allocated on the first change, every time set to now."""
        ia = self._changed.get(path)
        if ia is None:
            now = time.time_ns()
            ia = self._changed[path] = _Iattrs(None, 0, 0, now, now, now)
        return ia

    def chmod(self, path: str, mode: int) -> None:
        with self._lock:
            ia = self._iattrs(path)
            ia.mode = stat.S_IMODE(mode)
            ia.ctime = time.time_ns()

    def chown(self, path: str, uid: int, gid: int) -> None:
        """uid or gid -1: unchanged, as chown(2)."""
        with self._lock:
            ia = self._iattrs(path)
            if uid != -1:
                ia.uid = uid
            if gid != -1:
                ia.gid = gid
            ia.ctime = time.time_ns()

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        """`times` in ns as mfusepy passes them (None or UTIME_NOW: now; UTIME_OMIT: keep)."""
        with self._lock:
            ia = self._iattrs(path)
            now = time.time_ns()
            atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
            if atime != UTIME_OMIT:
                ia.atime = now if atime == UTIME_NOW else atime
            if mtime != UTIME_OMIT:
                ia.mtime = now if mtime == UTIME_NOW else mtime
            ia.ctime = now


def check_open(mode: int, accmode: int, *, can_read: bool, can_write: bool) -> None:
    """kernfs_fop_open(): EACCES unless the current mode *and* the file allow the access
    (root included: KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK is set for sysfs)."""
    wants_write = accmode in (os.O_WRONLY, os.O_RDWR)
    wants_read = accmode in (os.O_RDONLY, os.O_RDWR)
    if wants_write and not (mode & 0o222 and can_write):
        raise OSError(errno.EACCES, "Permission denied")
    if wants_read and not (mode & 0o444 and can_read):
        raise OSError(errno.EACCES, "Permission denied")


def no_namespace_change() -> OSError:
    """rename/unlink/mkdir/rmdir/symlink/link/mknod: sysfs has none of them."""
    return OSError(errno.EPERM, "Operation not permitted")


def no_create() -> OSError:
    """O_CREAT of a new name: kernfs directories have no i_op->create (the VFS's EACCES)."""
    return OSError(errno.EACCES, "Permission denied")


def process_owner(pid: int, start_time: int, proc_root: str = PROC_ROOT) -> tuple[int, int]:
    """(uid, gid) of the process (pid, start_time); root's when it is gone or the pid was
    reused, so a stranger never gets another process's figures."""
    return owner(TaskId(pid, start_time), proc_root) or ROOT_OWNER
