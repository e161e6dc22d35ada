"""Helpers for live engine tests: drive a Ksm like the daemon does, count its per-range
state, check its counters, and real children with a file's .data pages.

Plain functions and context managers (test modules wrap them in their own fixtures):
importing fixture functions confuses linters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.rmap import STABLE, UNSTABLE
from lksmfs.sources.base import PAGE_SIZE, TaskId
from lksmfs.system.proc import try_stat
from testkit.memproc import MemProcess
from testkit.patterns import Region

COUNTERS_NONNEG = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                   "rmap_items", "scanning_process", "ksm_zero_pages", "full_scans",
                   "pages_scanned", "tasks_exited", "stable_node_chains", "stable_node_dups")


# -------------------------------------------------------------------- driving an engine --


def settle(ksm: Ksm, now: float, lock: AbstractContextManager[object] | None = None,
           batch: int = 1 << 20, limit: int = 10_000) -> float:
    """Run crawler passes and scanner batches, as the daemon's two threads would, until
    both are idle; time is virtual (the crawler's wake-up times are jumped to, never
    slept).  Returns the virtual time reached."""
    lk = lock if lock is not None else contextlib.nullcontext()
    for _ in range(limit):
        with lk:
            nxt = ksm.crawl(now)
            while ksm.scanner_should_run():
                ksm.scan_batch(batch)
            idle = nxt is None and not ksm.scan_state
        if idle:
            return now
        if nxt is not None:
            now = max(now, nxt)
    raise AssertionError("crawler/scanner did not settle")


# ----------------------------------------------------------------------- inspection --


@dataclass(frozen=True)
class RangeCounts:
    """A slot's rmap items inside one address range, by tree."""

    items: int
    merged: int  # STABLE: mapped to a KSM page
    unshared: int  # UNSTABLE: in this round's unstable tree


def range_counts(ksm: Ksm, task: TaskId, vpn: int, npages: int) -> RangeCounts | None:
    """Items of `task`'s slot in [vpn, vpn + npages), or None if it has no slot."""
    slot = ksm.slots.get(task)
    if slot is None:
        return None
    r = slot.rmap
    sel = (r.vpn >= np.uint64(vpn)) & (r.vpn < np.uint64(vpn + npages))
    fl = r.flags[sel]
    return RangeCounts(int(np.count_nonzero(sel)), int(np.count_nonzero(fl & STABLE)),
                       int(np.count_nonzero(fl & UNSTABLE)))


def check_counters(ksm: Ksm, *, quiescent: bool) -> dict[str, int]:
    """The published counters are sane: none negative, and every rmap item is in exactly
    one of shared/sharing/unshared/volatile.  When no scan is in progress (`quiescent`),
    they must also agree with the slots' own rmap columns: STABLE items are the pages
    shared + sharing, UNSTABLE items the pages unshared, and rmap_items their total."""
    c = ksm.counters()
    for k in COUNTERS_NONNEG:
        assert c[k] >= 0, (k, c)
    assert c["rmap_items"] >= c["pages_shared"] + c["pages_sharing"] + c["pages_unshared"], c
    assert c["rmap_items"] == (c["pages_shared"] + c["pages_sharing"] + c["pages_unshared"]
                               + c["pages_volatile"]), c
    if quiescent:
        assert not ksm.scan_state
        rmaps = [s.rmap for s in [*ksm.slots.values(), *ksm.mm.remove_list]]
        assert c["rmap_items"] == sum(len(r) for r in rmaps), c
        assert c["pages_shared"] + c["pages_sharing"] == sum(
            int(np.count_nonzero(r.flags & STABLE)) for r in rmaps), c
        assert c["pages_unshared"] == sum(
            int(np.count_nonzero(r.flags & UNSTABLE)) for r in rmaps), c
        assert c["scanning_process"] == len(ksm.slots), c
    return c


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_of(pid: int) -> TaskId | None:
    """(pid, start time) of a live pid, None when it is gone."""
    st = try_stat(pid)
    return st.task_id if st is not None else None


def smaps_anon_pages(pid: int) -> int:
    """Anonymous pages of the mappings KSM may scan (private, not [vdso]/[vvar]...), from
    smaps' own `Anonymous:` lines: a count that does not go through the procfs source."""
    total = 0
    counted = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):
                parts = line.split()
                perms = parts[1]
                path = parts[5] if len(parts) > 5 else ""
                counted = perms[3] == "p" and path not in (
                    "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
            elif head == "Anonymous:" and counted:
                total += int(line.split()[1]) * 1024 // PAGE_SIZE
            elif head == "VmFlags:" and counted and {"pf", "io", "de", "ht", "mm"} & set(
                    line.split()[1:]):
                raise AssertionError(f"unexpected special mapping in {pid}")
    return total


# ------------------------------------------------------------ a child with a .data area --


@contextlib.contextmanager
def file_children(path: str, same: int, unique: int,
                  cpu_ms: int = 150) -> Iterator[Callable[[], MemProcess]]:
    """Factory of processes that map `same + unique` pages of the file `path` (created
    here, sized to fit) MAP_PRIVATE and write every one (COW: anonymous pages in a file
    mapping, LKSM_FILTER's file_data region), region "data": the first `same` pages hold
    one fixed byte (they merge), the others `unique` pages (they never merge).  Each has
    used `cpu_ms` of CPU (the short-task rule); all are killed at the end, whatever
    happens."""
    with open(path, "wb") as f:
        f.truncate((same + unique) * PAGE_SIZE)
    kids: list[MemProcess] = []
    region = Region("data", [(same, 0xA5), (unique, "unique")], kind="file", file=path)

    def spawn() -> MemProcess:
        kid = MemProcess(region, cpu_ms=cpu_ms, wait=False)
        kids.append(kid)
        kid.wait_ready()
        return kid

    try:
        yield spawn
    finally:
        for k in kids:
            k.close()


def workload_cgroup_root(name: str) -> str:
    """A fresh cgroup root for a spawned workload, beside the default one (v2, else the
    v1 freezer); skips where there is no root or no freezer."""
    import pytest

    from lksmfs.system.cgroups import CgroupError, default_root

    if os.geteuid() != 0:
        pytest.skip("live test needs root (cgroups, /proc/PID/mem)")
    try:
        return default_root(f"{name}-{os.getpid()}")
    except CgroupError as e:
        pytest.skip(f"no freezer cgroup: {e}")
