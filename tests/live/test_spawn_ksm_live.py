"""`ksm:` on real processes: the spawner does what the simulation assumes - prctl
(PR_SET_MEMORY_MERGE) for `prctl`, madvise(MADV_MERGEABLE) on exactly the listed
areas, nothing for `none` - seen by the kernel (/proc/PID/ksm_stat, smaps VmFlags `mg`)
and by lksmfs's ksm policy, which tracks the same pages as on simulated memory."""

from __future__ import annotations

import os
from typing import Any

import pytest

from lksmfs.commands.scan import scan_processes
from lksmfs.engine.ksm import Ksm
from lksmfs.system.proc import parse_ksm_stat
from lksmfs.workload.schema import parse_workload
from lksmfs.workload.simulated import SimulatedSource
from lksmfs.workload.spawn import spawn_workload
from testkit.kernel_ksm import KernelKsm

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

LIBS = [{"name": "libk.so", "data_pages": 3, "bss_pages": 2, "share": 1.0, "bss_share": 1.0}]


def app(name: str, ksm: Any) -> dict[str, Any]:
    return {"name": name, "count": 2, "libraries": ["libk.so"], "heap": {"pages": 6, "share": 1.0},
            "stack": {"pages": 2, "share": 1.0}, "anon": [{"name": "gpu", "pages": 5, "share": 1.0}],
            "cpu_ms": 150, "ksm": ksm}


WORKLOAD = {"seed": 11, "libraries": LIBS,
            "apps": [app("anyp", "prctl"), app("areas", ["heap", "gpu", "bss"]), app("nothing", "none")]}


def smaps_mg(pid: int) -> list[tuple[int, int, bool]]:
    """(start, end, VM_MERGEABLE) of every VMA, from /proc/PID/smaps."""
    out: list[tuple[int, int, bool]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                a, b = head.split("-")
                out.append((int(a, 16), int(b, 16), False))
            elif head == "VmFlags:":
                out[-1] = (out[-1][0], out[-1][1], "mg" in line.split()[1:])
    return out


def mergeable(vmas: list[tuple[int, int, bool]], addr: int, npages: int) -> bool:
    """Is every page of [addr, addr + npages) in a VM_MERGEABLE VMA?"""
    end = addr + npages * os.sysconf("SC_PAGE_SIZE")
    cover = [(a, b, mg) for a, b, mg in vmas if a < end and b > addr]
    assert cover and cover[0][0] <= addr and cover[-1][1] >= end
    return all(mg for _, _, mg in cover)


def test_each_apps_opt_in_reaches_the_kernel_and_lksmfs() -> None:
    workload = parse_workload(WORKLOAD, "w.yaml")
    # the children are mergeable for the kernel's KSM: hold the oracle's lock meanwhile
    with KernelKsm(), spawn_workload(workload, timeout=30) as procs:
        by_app: dict[str, list[Any]] = {}
        for inst in procs.live():
            by_app.setdefault(inst.app, []).append(inst)
            stat = parse_ksm_stat(open(f"/proc/{inst.pid}/ksm_stat", "rb").read())
            vmas = smaps_mg(inst.pid)
            flags = {sid: mergeable(vmas, addr, n) for sid, (addr, n) in inst.sections.items()}
            if inst.app == "anyp":
                assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == ("yes", "yes")
                assert all(flags.values()), flags
            elif inst.app == "areas":
                assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == ("no", "yes")
                assert flags == {"lib:libk.so:data": False, "lib:libk.so:bss": True, "heap": True,
                                 "stack": False, "anon:gpu": True}, flags
            else:
                assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == ("no", "no")
                assert not any(flags.values()), flags
        # lksmfs's ksm policy on the madvised app: heap 6 + gpu 5 + bss 2 = 13 pages an
        # instance, alike in both -> 26 items, 13 KSM pages, 13 sharing; as simulated
        pids = [i.pid for i in by_app["areas"]]
        real = scan_processes(pids=pids, rounds=3, policy="ksm", filter_enabled=False, settings={"smart_scan": 0})
    sim = Ksm(SimulatedSource(parse_workload({**WORKLOAD, "apps": [WORKLOAD["apps"][1]]}, "w.yaml")), policy="ksm")
    sim.tunables.smart_scan = 0
    for _ in range(3):
        sim.full_scan()
    want = (26, 13, 13)
    assert tuple(sim.counters()[k] for k in ("rmap_items", "pages_shared", "pages_sharing")) == want
    last = real["scans"][-1]["counters"]
    assert tuple(last[k] for k in ("rmap_items", "pages_shared", "pages_sharing")) == want
