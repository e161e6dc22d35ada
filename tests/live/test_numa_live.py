"""Each page's NUMA node from the kernel (move_pages(2), numa_maps), and
merge_across_nodes = 0 on this host's real processes.

This host has one node, so per-node trees change nothing here: the same counters as
with one tree.  What a second node adds (pages of two nodes never merging, LTP
ksm02/04/06) is tested on simulated memory (tests/unit/test_numa_nodes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lksmfs.commands.scan import scan_processes
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.system import numa
from lksmfs.system.proc import task_id
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PatternGroup

pytestmark = pytest.mark.live

SpawnFn = Callable[..., Any]


def online_nodes() -> list[int]:
    """/sys/devices/system/node/online: `0` or ranges like `0-3,5`."""
    out: list[int] = []
    for part in Path("/sys/devices/system/node/online").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_page_nodes_of_a_child(live: Any, spawn_mem_child: SpawnFn) -> None:
    """6 written pages are on an online node (this host's only one); 3 never touched
    pages are on none (move_pages: -ENOENT -> -1); numa_maps, per mapping, says the
    same node for the written ones."""
    nodes = online_nodes()
    c = spawn_mem_child([1, 2, 3, 4, 5, 6], untouched=3)
    v0 = c.vpn("private")
    vpns = np.arange(v0, v0 + 9, dtype=np.uint64)
    src = ProcfsSource()
    try:
        got = src.page_nodes(task_id(c.pid), vpns)
    finally:
        src.close()
    assert got[:6].tolist() == [got[0]] * 6 and int(got[0]) in nodes
    assert got[6:].tolist() == [-1] * 3
    assert numa.numa_maps_nodes(c.pid, vpns)[:6].tolist() == got[:6].tolist()
    if len(nodes) == 1:
        assert got[0] == nodes[0]


def test_per_node_trees_on_one_node_change_nothing(live: Any) -> None:
    """merge_across_nodes 0 on one node: the same counters as 1 (LTP ksm01's first
    phase: c 64 + a 128 in three madvised processes -> 2 KSM pages, 190 sharing)."""
    ok, why = KernelKsm.available()
    if not ok:
        pytest.skip(why)
    if len(online_nodes()) != 1:
        pytest.skip("this host has several nodes: the counters differ by the pages' placement")
    n = 64
    # the children are mergeable for the kernel's KSM: hold the oracle's lock meanwhile
    with KernelKsm(), PatternGroup((((n, "c"),), ((n, "a"),), ((n, "a"),)), scope="madvise") as group:
        got = {}
        for mac in (1, 0):
            r = scan_processes(pids=group.pids, rounds=3, policy="ksm", filter_enabled=False,
                               settings={"merge_across_nodes": mac, "smart_scan": 0})
            got[mac] = tuple(r[k] for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))
    assert got[0] == got[1] == (2, 63 + 127, 0, 0)
