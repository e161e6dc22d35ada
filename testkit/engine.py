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

from lksmfs.engine.hashindex import HashIndex
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.rmap import STABLE, UNSTABLE
from lksmfs.engine.unstable import UnstableTree
from lksmfs.sources.base import PAGE_SIZE, TaskId
from lksmfs.system.proc import try_stat
from lksmfs.workload.driver import Driver, VirtualClock
from testkit.memproc import MemProcess
from testkit.patterns import Region

COUNTERS_NONNEG = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                   "rmap_items", "scanning_process", "ksm_zero_pages", "full_scans",
                   "pages_scanned", "tasks_exited", "stable_node_chains", "stable_node_dups")


# -------------------------------------------------------------------- driving an engine --


def settle(ksm: Ksm, now: float, lock: AbstractContextManager[object] | None = None,
           batch: int = 1 << 20, limit: int = 10_000) -> float:
    """Run crawler passes and scanner batches (the one driver, lksmfs.workload.driver),
    as the daemon's two threads would, until both are idle; time is virtual (the
    crawler's wake-up times are jumped to, never slept), each step under `lock`.
    Returns the virtual time reached."""
    clock = VirtualClock(now)
    Driver(ksm, clock, lock=lock).settle(limit, batch)
    return clock.now


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


# ------------------------------------------------------------ the whole engine state --


def _entries(index: HashIndex) -> dict[int, int]:
    """The live key -> value pairs of a HashIndex (its layout aside)."""
    keys = index.keys
    vals = index.vals
    live = keys > np.uint64(1)
    return dict(zip(keys[live].tolist(), vals[live].tolist(), strict=True))


def _tree_entries(tree: UnstableTree) -> dict[int, tuple[int, int] | None]:
    """The live entries of an unstable tree: key -> (slot id, list index), None for an
    entry of an earlier visit (the numbering of the visits aside)."""
    out: dict[int, tuple[int, int] | None] = {}
    for key, ref in _entries(tree.index).items():
        got = tree.where(ref)
        out[key] = None if got is None else (got[0].sid, got[1])
    return out


def engine_state(ksm: Ksm) -> dict[str, object]:
    """Everything the engine will ever act on, as plain values: two engines with equal
    states behave alike from here on (lksmfs.engine.fastpass is checked against the
    engine's own scanner with it).  Wall times and hash-table layouts are left out."""
    st = ksm.stable
    n = st._next_id
    slots = {}
    for s in [*ksm.mm.slots.values(), *ksm.mm.remove_list]:
        rm = s.rmap
        slots[s.sid] = {
            "task": s.task, "state": s.state, "merge_win": list(s.merge_win), "merge_idx": s.merge_idx,
            "nr_merged": s.nr_merged, "elapsed": s.elapsed, "nr_scans": s.nr_scans, "vip_seq": s.vip_seq,
            "removed": s.removed, "regions": sorted(s.regions), "zero": s.zero_vpns.tolist(),
            "rmap": {c: getattr(rm, c).tolist() for c in ("vpn", "flags", "seq", "cksum", "node", "region", "off",
                                                          "age", "skips")},
        }
    crawler = {k: v for k, v in vars(ksm.crawler).items() if k != "k"}
    sc = ksm.scanner
    regions = {rid: (int(r.type), r.len, r.key, r.scan_round, r.merge_cnt, r.filter_cnt, r.conflict, r.refcount,
                     r.next, r.prev, None if r.bits is None else r.bits.tobytes())
               for rid, r in ksm.regions.regions.items()}
    return {
        "counters": dict(ksm.counters()),
        "region_share": dict(ksm.region_share()),
        "stats": dict(vars(ksm.stats)),
        "tunables": dict(vars(ksm.tunables)),
        "last_scan": {k: v for k, v in ksm.last_scan.items() if k != "wall_s"},
        "slots": slots,
        "order": [s.sid for s in ksm.mm.slots.values()],
        "scan_list": [s.sid for s in ksm.mm.scan_list],
        "vips": [s.sid for s in ksm.mm.vips.values()],
        "vip_seq": ksm.mm._vip_seq,
        "stable": {"lo": st.lo[:n].tolist(), "hi": st.hi[:n].tolist(), "len": st.nlen[:n].tolist(),
                   "chain": st._chain.a[:n].tolist(), "free": list(st._free), "chains": {c: list(d) for c, d in
                                                                                       st.chains.items()},
                   "room": {c: list(d) for c, d in st._room.items()}, "singular": dict(st._singular),
                   "index": _entries(st.index)},
        "unstable": _tree_entries(ksm.unstable),
        "regions": (regions, dict(ksm.regions.by_key), ksm.regions.nr_regions, list(ksm.regions.region_share)),
        "scanner": {"scan_state": sc.scan_state, "scan_mode": sc.scan_mode, "scan_round": sc.scan_round,
                    "cur": None if sc.cur is None else sc.cur.sid, "gen": sc.gen is not None,
                    "at_head": sc._at_head, "hint": sc._unstable_hint, "last_prune": sc._last_prune,
                    "started": sc._started},
        "crawler": crawler,
    }


def state_diff(a: object, b: object, path: str = "") -> str | None:
    """Where two engine_state() values first differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}/{key}: only in one"
            got = state_diff(a[key], b[key], f"{path}/{key}")
            if got:
                return got
        return None
    if a != b:
        return f"{path}: {str(a)[:200]} != {str(b)[:200]}"
    return None
