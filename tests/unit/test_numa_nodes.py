"""merge_across_nodes = 0 on simulated memory spread over NUMA nodes (lksmfs.engine.numa):
one stable and one unstable tree per node, as mm/ksm.c keeps them - pages of two nodes
never merge, each node gets its own KSM page of a content, its own chains.  Counters
worked out by hand in the comments."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.numa import fold_nodes
from lksmfs.engine.pages import XXH3, digest_pages, is_zero_digest
from lksmfs.sources.base import PAGE_SIZE
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.schema import WorkloadError, parse_workload
from lksmfs.workload.simulated import SimulatedSource

P = 16  # pages per instance: heap 4, stack 2, gpu 5, libx .data 3 and .bss 2, all alike
KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "stable_node_chains",
        "stable_node_dups")


def workload(nodes: list[int], count: int = 4) -> dict[str, Any]:
    libs = [{"name": "libx.so", "data_pages": 3, "bss_pages": 2, "share": 1.0, "bss_share": 1.0}]
    return {"seed": 3, "libraries": libs, "apps": [{
        "name": "a", "count": count, "libraries": ["libx.so"], "heap": {"pages": 4, "share": 1.0},
        "stack": {"pages": 2, "share": 1.0}, "anon": [{"name": "gpu", "pages": 5, "share": 1.0}],
        "ksm": "prctl", "numa_nodes": nodes}]}


def converged(nodes: list[int], policy: str, mac: int, mps: int = 256) -> dict[str, int]:
    ksm = Ksm(SimulatedSource(parse_workload(workload(nodes), "w.yaml")), policy=policy, filter_enabled=False)
    table = AttributeTable(ksm)
    table.store("merge_across_nodes", f"{mac}\n".encode())
    table.store("max_page_sharing", f"{mps}\n".encode())
    if policy == "ksm":
        ksm.tunables.smart_scan = 0
    for _ in range(4):
        ksm.full_scan()
    c = ksm.counters()
    assert c["rmap_items"] == 4 * P
    return {k: c[k] for k in KEYS}


@pytest.mark.parametrize("policy", ["ksm", "lksm"])
@pytest.mark.parametrize(("nodes", "mac", "want"), [
    # one node, or merging across nodes: each of the P contents on 4 instances ->
    # one KSM page and 3 sharing
    ([0], 0, (P, 3 * P, 0, 0, 0, 0)),
    ([0, 1], 1, (P, 3 * P, 0, 0, 0, 0)),
    # instances 0, 2 on node 0 and 1, 3 on node 1: a KSM page per node per content,
    # each with 2 maps -> 2P shared, 2P sharing
    ([0, 1], 0, (2 * P, 2 * P, 0, 0, 0, 0)),
    # 0, 1, 2 on node 0 (3 maps), 3 alone on node 2: it waits in node 2's unstable tree
    ([0, 0, 0, 2], 0, (P, 2 * P, P, 0, 0, 0)),
    # every instance on its own node: nothing merges, every page unshared
    ([0, 1, 2, 3], 0, (0, 0, 4 * P, 0, 0, 0)),
])
def test_per_node_trees(policy: str, nodes: list[int], mac: int, want: tuple[int, ...]) -> None:
    assert tuple(converged(nodes, policy, mac).values()) == want


def test_chains_are_per_node() -> None:
    """max_page_sharing 2, 4 instances on nodes 0, 0, 1, 1.  Across nodes each content
    has 4 maps: two dups of 2 maps under a chain -> 2P shared, 2P sharing, P chains, 2P
    dups.  Per node each content has 2 maps per node: one KSM page each, no chain."""
    assert tuple(converged([0, 1], "ksm", 1, mps=2).values()) == (2 * P, 2 * P, 0, 0, P, 2 * P)
    assert tuple(converged([0, 1], "ksm", 0, mps=2).values()) == (2 * P, 2 * P, 0, 0, 0, 0)


def test_switching_needs_no_ksm_pages() -> None:
    """merge_across_nodes_store(): EBUSY while KSM pages exist, accepted after run=2."""
    ksm = Ksm(SimulatedSource(parse_workload(workload([0, 1]), "w.yaml")), policy="ksm")
    table = AttributeTable(ksm)
    ksm.full_scan()
    ksm.full_scan()
    assert ksm.counters()["pages_shared"] == P
    with pytest.raises(OSError) as e:
        table.store("merge_across_nodes", b"0\n")
    assert e.value.errno == errno.EBUSY and table.show("merge_across_nodes") == b"1\n"
    table.store("run", b"2\n")
    table.store("merge_across_nodes", b"0\n")
    assert table.show("merge_across_nodes") == b"0\n"


def test_fold_keeps_node_0_and_zero_pages_with_use_zero_pages() -> None:
    pages = bytes(PAGE_SIZE) + b"\x01" * PAGE_SIZE
    lo, hi = digest_pages(pages, 2)
    lo2, hi2 = np.concatenate([lo, lo]), np.concatenate([hi, hi])
    nodes = np.array([0, 0, 1, 1])
    flo, fhi = fold_nodes(lo2, hi2, nodes, keep_zero=XXH3)
    assert (flo[:3] == lo2[:3]).all() and flo[3] != lo2[3]  # zero page on node 1 kept
    assert is_zero_digest(flo, fhi).tolist() == [True, False, True, False]
    flo, fhi = fold_nodes(lo2, hi2, nodes, keep_zero=None)
    assert is_zero_digest(flo, fhi).tolist() == [True, False, False, False]
    assert flo[1] != flo[3] and fhi[3] <= np.uint64(0xFFFFFFFF)


def test_numa_nodes_are_checked() -> None:
    with pytest.raises(WorkloadError, match=r"w.yaml: apps\[0\].numa_nodes: expected a non-empty list"):
        parse_workload(workload([]), "w.yaml")
    with pytest.raises(WorkloadError, match=r"apps\[0\].numa_nodes\[1\]: must be <= 1023"):
        parse_workload(workload([0, 5000]), "w.yaml")
    w = parse_workload(workload([1, 0]), "w.yaml")
    assert parse_workload(w.to_dict(), "again").apps[0].numa_nodes == (1, 0)
