"""The NUMA node of a process's pages: move_pages(2) with no target nodes, numa_maps.

move_pages(pid, count, pages, NULL, status, 0) moves nothing and reports in status the
node each page is on (or -errno: -ENOENT for a page not present, -EFAULT outside any
mapping); it needs the same rights as ptrace-reading the process (root here).  When the
call is refused (ENOSYS: a kernel without NUMA, EPERM), /proc/PID/numa_maps says per
mapping how many pages each node holds (`N1=12`): a mapping whose pages are all on one
node gives them that node, any other page reads -1 (unknown).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re

import numpy as np

from lksmfs.system.proc import PAGE_SHIFT, PROC_ROOT, read_all

# __NR_move_pages
_SYSCALLS = {"x86_64": 279, "aarch64": 239, "armv7l": 344, "riscv64": 239, "i686": 317}
_BATCH = 1 << 14
_NODE_COUNT = re.compile(r"N(\d+)=\d+")
_libc = ctypes.CDLL(None, use_errno=True)


def move_pages_nodes(pid: int, vpns: np.ndarray) -> np.ndarray:
    """move_pages(2)'s status for each page: its node, or -errno.  OSError when the call
    itself fails."""
    nr = _SYSCALLS.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"move_pages: unknown syscall number on {platform.machine()}")
    out = np.empty(vpns.shape[0], dtype=np.int32)
    for b in range(0, int(vpns.shape[0]), _BATCH):
        addrs = np.ascontiguousarray(vpns[b : b + _BATCH].astype(np.uint64) << np.uint64(PAGE_SHIFT))
        status = np.empty(addrs.shape[0], dtype=np.int32)
        ret = _libc.syscall(nr, ctypes.c_long(pid), ctypes.c_ulong(addrs.shape[0]),
                            ctypes.c_void_p(addrs.ctypes.data), None,
                            ctypes.c_void_p(status.ctypes.data), ctypes.c_int(0))
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"move_pages({pid}): {os.strerror(err)}")
        out[b : b + addrs.shape[0]] = status
    return out


def numa_maps_nodes(pid: int, vpns: np.ndarray, proc_root: str = PROC_ROOT) -> np.ndarray:
    """Each page's node from /proc/PID/numa_maps where its mapping is on one node, else -1."""
    out = np.full(vpns.shape[0], -1, dtype=np.int32)
    text = read_all(f"{proc_root}/{pid}/numa_maps").decode("ascii", "replace")
    starts = []
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        on = [int(m.group(1)) for f in fields[1:] if (m := _NODE_COUNT.fullmatch(f))]
        starts.append(int(fields[0], 16) >> PAGE_SHIFT)
        nodes.append(on[0] if len(on) == 1 else -1)
    if not starts:
        return out
    # a page belongs to the last mapping starting at or below it (numa_maps has no ends:
    # pages outside any mapping are never asked for)
    at = np.searchsorted(np.array(starts, dtype=np.uint64), vpns.astype(np.uint64), side="right") - 1
    ok = at >= 0
    out[ok] = np.array(nodes, dtype=np.int32)[at[ok]]
    return out


def page_nodes(pid: int, vpns: np.ndarray, proc_root: str = PROC_ROOT) -> np.ndarray:
    """The node of each page, -1 where neither way can tell."""
    try:
        got = move_pages_nodes(pid, vpns)
        return np.where(got >= 0, got, -1).astype(np.int32)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise
    try:
        return numa_maps_nodes(pid, vpns, proc_root)
    except PermissionError:  # no way to tell: node 0's trees
        return np.full(vpns.shape[0], -1, dtype=np.int32)
