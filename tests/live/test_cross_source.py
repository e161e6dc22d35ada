"""The same workload through the simulated source and through real processes gives the
same sharing over the memory the workload defines (root: real /proc, real cgroups).

Real processes also carry their Python runtime's pages; those are kept out of the
comparison by counting per workload section (its address range in each instance), never
by loosening the comparison.  Per section and instance, after full scans:

- merged   = rmap items flagged STABLE (mapped to a KSM page),
- unshared = rmap items flagged UNSTABLE (in the unstable tree),

and these must be equal in the simulated engine, in the real engine, and in a table worked
out by hand from the workload's fractions and the LKSM rules.

Why the real runtime cannot change a section's figures here, and when it could:
- Unique and shared workload pages are keyed by 64-bit hashes of (seed, instance/pool,
  section, offset): no runtime page holds those bytes, so they merge only with workload
  pages, exactly as in the simulation.
- Zero-filled pages are the exception: the runtime has zero pages too.  A workload zero
  page with no zero twin among the scanned workload pages would be unshared in the
  simulation but merged for real.  Both workloads have at least two zero pages among the
  scanned instances, so every zero page is merged in both (for real it shares the same
  KSM page as the runtime's zero pages; that only changes pages_sharing, not which items
  are STABLE).
- max_page_sharing: with the default 256, the runtime's many zero pages could fill a
  stable node and leave a workload zero page in the unstable tree until a new dup forms.
  It is raised (through the attribute ABI, before any stable node exists) so that every
  content has one stable node.
- The short-task rule is the same in both: the task under 100 ms of CPU is never
  registered (its pages would otherwise pair some of the others').
- Nothing is rewritten between scans (no round is advanced), so volatile pages stay put.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.sources.base import MemorySource, TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.schema import load_workload
from lksmfs.workload.simulated import SimulatedSource
from lksmfs.workload.spawn import spawn_workload
from testkit.engine import range_counts, workload_cgroup_root

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "config" / "workloads" / "small.yaml"
ZERO_HEAP_BSS = Path(__file__).resolve().parent / "data" / "cross_zero_heap_bss.yaml"
FOO, BAR, LZ, LQ = "lib:libfoo.so.1", "lib:libbar.so.2", "lib:libz.so.1", "lib:libq.so.0"

# (merged, unshared) per instance and section, by hand from the workload files.  Counts of
# shared/zero/unique pages per section are round_half_up(fraction * pages); shared library
# pages are equal at equal offsets in every mapper, shared heap/anon pages are pool pages
# 0, 1, 2... equal in every app using that pool.  A page is merged iff some other scanned
# page has its bytes; the short tasks (widget, gamma) are not scanned.
VIEWER = {
    f"{FOO}:data": (3, 1),  # 2 shared (3 mappers) + 1 zero merged, 1 unique
    f"{FOO}:bss": (2, 0),  # bss_share/bss_zero default to 0.5/0.25: 1 shared + 1 zero
    f"{BAR}:data": (2, 0),  # share 1.0, two viewers map it (widget is skipped)
    f"{BAR}:bss": (1, 0),
    "heap": (6, 2),  # heap pool 0-3 (in both viewers) + 2 zero; 2 unique
    "stack": (0, 2),  # share 0: unique
}
HAND_SMALL = {
    "viewer/0": VIEWER,
    "viewer/1": VIEWER,
    "player/0": {
        f"{FOO}:data": (3, 1),
        f"{FOO}:bss": (2, 0),
        "heap": (2, 2),  # heap pool 0-1 pair the viewers'; 2 unique
        "stack": (0, 2),
        "anon:gpu": (0, 4),  # pool `gpu` pages 0-1 exist only in player/0: unshared
    },
}
ALPHA = {
    f"{LZ}:data": (2, 1),  # 1 shared + 1 zero merged, 1 unique
    f"{LZ}:bss": (6, 0),  # 3 shared + 3 zero
    "heap": (6, 0),  # heap pool 0-2 (alpha/0, alpha/1, beta/0) + 3 zero
    "stack": (0, 1),
}
HAND_ZERO_HEAP_BSS = {
    "alpha/0": ALPHA,
    "alpha/1": ALPHA,
    "beta/0": {
        f"{LZ}:data": (2, 1),
        f"{LZ}:bss": (6, 0),
        f"{LQ}:data": (1, 0),  # all zero
        f"{LQ}:bss": (4, 0),
        "heap": (3, 2),  # pool 0-2 pair alpha's; pool 3 only gamma has (skipped); 1 unique
        "stack": (2, 0),  # two zero pages
        "anon:cache": (2, 2),  # 2 zero merged; pool `cache` 0-1 only here: unshared
    },
}

Table = dict[str, dict[str, tuple[int, int]]]


def _model_table(sim: SimulatedSource, scanned: list[str]) -> Table:
    """The same table from the workload model's page keys alone (no engine): merged iff
    the key occurs at least twice among the scanned instances' workload pages."""
    counts: Counter[int] = Counter()
    for n in scanned:
        counts.update(sim.instance(n).keys.tolist())
    out: Table = {}
    for n in scanned:
        inst = sim.instance(n)
        out[n] = {}
        for sid, (lo, hi) in inst.section_slice.items():
            dup = np.array([counts[int(k)] >= 2 for k in inst.keys[lo:hi]], dtype=bool)
            out[n][sid] = (int(dup.sum()), int((~dup).sum()))
    return out


def _table(ksm: Ksm, sections: dict[str, dict[str, tuple[TaskId, int, int]]]) -> Table:
    """(merged, unshared) per registered instance and section from the engine's rmap
    items; every present workload page must have an item (the scan covered it all)."""
    out: Table = {}
    for name, secs in sections.items():
        row: dict[str, tuple[int, int]] = {}
        for sid, (task, vpn, npages) in secs.items():
            rc = range_counts(ksm, task, vpn, npages)
            if rc is None:  # not registered (the short task)
                break
            assert rc.items == npages, (name, sid, rc)
            row[sid] = (rc.merged, rc.unshared)
        else:
            out[name] = row
    return out


def _engine(source: MemorySource, self_pid: int | None) -> Ksm:
    ksm = Ksm(source, self_pid=self_pid)
    # through the ABI, as resourced would: accepted while no stable node exists
    assert AttributeTable(ksm).store("max_page_sharing", b"65536\n") == len(b"65536\n")
    assert ksm.tunables.max_page_sharing == 65536
    return ksm


def _cgroup_root(tag: str) -> str:
    return workload_cgroup_root(f"lksmfs-cross-{tag}")


@pytest.mark.parametrize(
    ("path", "hand"), [(SMALL, HAND_SMALL), (ZERO_HEAP_BSS, HAND_ZERO_HEAP_BSS)],
    ids=["small", "zero_heap_bss"],
)
def test_simulated_and_real_sources_share_the_same_pages(path: Path, hand: Table) -> None:
    root = _cgroup_root(path.stem)
    workload = load_workload(str(path))
    sim = SimulatedSource(workload)
    scanned = sorted(hand)
    assert _model_table(sim, scanned) == hand  # the hand table agrees with the model

    with spawn_workload(workload, cgroup_root=root, timeout=30) as procs:
        assert sorted(procs.instances) == sorted(sim.instances())
        src = ProcfsSource(scope=Scope(pids=set(procs.pids())))
        try:
            real = _engine(src, os.getpid())
            simk = _engine(sim, None)
            sim_secs = {n: {sid: (sim.task_of(n), sim.section_vpn(n, sid),
                                  sec.npages)
                            for sid, sec in sim.instance(n).model.sections.items()}
                        for n in sim.instances()}
            real_secs = {i.name: {sid: (i.task, addr // 4096, npages)
                                  for sid, (addr, npages) in i.sections.items()}
                         for i in procs.live()}
            # the instance sets and their sections are the same on both sides
            assert {n: sorted(s) for n, s in sim_secs.items()} == \
                   {n: sorted(s) for n, s in real_secs.items()}

            for k in range(1, 4):
                simk.full_scan()
                real.full_scan()
                if k == 1:
                    # first initial round: every page is checksummed only (the gate wants
                    # the same checksum twice), so nothing is in either tree yet
                    zero = {n: {sid: (0, 0) for sid in s} for n, s in hand.items()}
                    assert _table(simk, sim_secs) == zero
                    assert _table(real, real_secs) == zero

            # the short task is registered by neither engine; the others by both
            assert {sim.instance_of(t) for t in simk.slots} == set(scanned)
            assert {t for t in real.slots} == {procs.instance(n).task for n in scanned}
            assert _table(simk, sim_secs) == hand
            assert _table(real, real_secs) == hand
            # the simulation has nothing but workload pages: its totals are the table's
            c = simk.counters()
            merged = sum(m for row in hand.values() for m, _ in row.values())
            unshared = sum(u for row in hand.values() for _, u in row.values())
            assert c["pages_shared"] + c["pages_sharing"] == merged
            assert c["pages_unshared"] == unshared
            # for real, the runtime adds pages on top but never takes workload ones away
            rc = real.counters()
            assert rc["pages_shared"] + rc["pages_sharing"] >= merged
            assert rc["pages_unshared"] >= unshared
        finally:
            src.close()
