"""The mountpoint before a mount: created when missing, a stale FUSE mount of a killed
daemon detached, a live one refused."""

from __future__ import annotations

import errno
import logging
import os

from lksmfs.system.mounts import is_mountpoint, lazy_unmount

log = logging.getLogger("lksmfs.daemon")  # the daemon's logger: log lines keep their name


def _probe(path: str) -> None:
    """Raise what the file system under `path` answers.  statfs always reaches a FUSE
    daemon (stat may be served from the kernel's attribute cache for a second)."""
    os.stat(path)
    os.statvfs(path)


def prepare_mountpoint(path: str) -> None:
    """Create the directory; lazily unmount a dead FUSE mount left by a killed daemon.

    A stale FUSE mount answers ENOTCONN; mounting over it would hide it but leave every
    old `cd` into it broken, so it is detached first.  A live mount is refused.
    """
    try:
        _probe(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
        log.info("mountpoint %s did not exist: created it (mkdir -p)", path)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: stale mount (ENOTCONN), unmounting it", path)
        lazy_unmount(path)
        _probe(path)  # raises if still dead
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "mountpoint is not a directory", path)
    if is_mountpoint(path):
        raise OSError(errno.EBUSY, "something is already mounted there (another lksmfs?)", path)
