"""The engine equals the plain page-at-a-time reference (testkit/reference.py) after every
full scan, on random workloads.

Both run the same processes (tests/unit/memfake.py's in-memory source for the engine,
dicts of pages for the reference): both policies, use_zero_pages, max_page_sharing from 2
(chains of dups) to 256, LKSM_FILTER on and off (every process maps one library's .data:
a file_data region, mature from round 6), pages rewritten between scans (merged pages
broken, zero pages written, pages changing during the checksum rounds, pages written in
a mature region), processes exiting.  Not covered: huge pages, frozen tasks, partial
scans, file_bss regions and region conflicts.  The counters pages_shared, pages_sharing,
pages_unshared, pages_volatile, stable_node_chains, stable_node_dups and ksm_zero_pages
must be equal after every scan (up to a known difference among equally full dups, see
test_among_equally_full_dups_the_head_of_the_chain_list_is_chosen).  The reference
shares no code with the engine: a disagreement is a bug in one of them.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.workload.driver import VirtualClock
from testkit.reference import COUNTERS, Process, ReferenceKsm

PALETTE = [bytes(PAGE_SIZE), fill("a"), fill("b"), fill("c")]
UNIQUE = len(PALETTE)  # a content of this page alone
SCANS = 9  # a region made before round 1 (in round 0) filters from round 6 (LKSM_REGION_MATURE)
F = (1, 100)  # the file every process maps (a library's .data): one file_data region
F_PAGES = 80  # its mapping, the same size in every process (no resize, no conflict)


def content(c: int, p: int, o: int, phase: int) -> bytes:
    return PALETTE[c] if c < UNIQUE else unique(1 + ((phase * 8 + p) * 2 + (o >= 1000)) * 4096 + o % 1000)


contents = st.integers(0, UNIQUE)
specs = st.fixed_dictionaries({
    "policy": st.sampled_from(["lksm", "ksm"]),
    "mps": st.one_of(st.integers(2, 5), st.integers(2, 256)),
    "zero": st.booleans(),
    "filter": st.booleans(),
    # per process: its anonymous pages, (policy ksm) whether its mappings are VM_MERGEABLE,
    # and the written pages of its mapping of F (offsets 0..)
    "procs": st.lists(st.tuples(st.lists(contents, min_size=1, max_size=24), st.booleans(),
                                st.lists(contents, max_size=12)),
                      min_size=1, max_size=4),
    # before scan s (1..SCANS-1): (scan, process, mapping (0 anonymous, 1 F), page, content)
    # writes - late ones land in mature regions - and exits
    "writes": st.lists(st.tuples(st.integers(1, SCANS - 1), st.integers(0, 3), st.integers(0, 1),
                                 st.integers(0, 23), contents), max_size=12),
    "exits": st.dictionaries(st.integers(0, 3), st.integers(1, SCANS - 1), max_size=2),
})

Result = list[dict[str, int]]


def build(spec: dict[str, Any]) -> tuple[FakeSource, list[TaskId], dict[int, list[list[int]]]]:
    """The engine's source: per process an anonymous mapping, then its mapping of F (after
    it: the anonymous one is no .bss); the vpns of each mapping's pages."""
    src = FakeSource()
    tasks: list[TaskId] = []
    layout: dict[int, list[list[int]]] = {}
    for p, (pages, mergeable, fpages) in enumerate(spec["procs"]):
        base = 0x1000000 * (p + 1)
        m = Mapping(base, base + len(pages) * PAGE_SIZE, vm_mergeable=mergeable)
        at = base + 128 * PAGE_SIZE
        f = Mapping(at, at + F_PAGES * PAGE_SIZE, "rw-p", F, "/lib/libF.so", vm_mergeable=mergeable)
        tasks.append(src.add(f"p{p}", [(m, {o: content(c, p, o, 0) for o, c in enumerate(pages)}),
                                       (f, {o: content(c, p, 1000 + o, 0) for o, c in enumerate(fpages)})]))
        layout[p] = [[m.start_vpn + o for o in range(len(pages))], [f.start_vpn + o for o in range(len(fpages))]]
    return src, tasks, layout


def run_both(spec: dict[str, Any]) -> tuple[Result, Result]:
    """The engine's and the reference's counters after each scan (one virtual clock and
    prune interval for both: stable_node_dup() prunes on it)."""
    src, tasks, layout = build(spec)
    clock = VirtualClock()
    ksm = Ksm(src, filter_enabled=spec["filter"], clock=clock, policy=spec["policy"])
    ksm.tunables.max_page_sharing = spec["mps"]
    ksm.tunables.use_zero_pages = int(spec["zero"])
    ksm.tunables.smart_scan = 0  # mainline's skipping of pages that did not merge: not modelled
    ref = ReferenceKsm(policy=spec["policy"], max_page_sharing=spec["mps"], use_zero_pages=spec["zero"],
                       filter_enabled=spec["filter"], clock=clock,
                       stable_node_chains_prune_millisecs=ksm.tunables.stable_node_chains_prune_millisecs)
    procs: dict[int, Process] = {}
    for p, (pages, mergeable, fpages) in enumerate(spec["procs"]):
        seen = spec["policy"] == "lksm" or mergeable
        anon = {v: content(c, p, o, 0) for o, (v, c) in enumerate(zip(layout[p][0], pages, strict=True))}
        file = {v: content(c, p, 1000 + o, 0) for o, (v, c) in enumerate(zip(layout[p][1], fpages, strict=True))}
        start = src.procs[tasks[p]].vmas[1].mapping.start_vpn
        procs[tasks[p].pid] = Process(anon | file if seen else {}, files=[(start, start + F_PAGES, F)])
    got: Result = []
    want: Result = []
    for scan in range(SCANS):
        for s, p, vma, off, c in spec["writes"]:
            if s == scan and p in layout and off < len(layout[p][vma]) and procs[tasks[p].pid].alive:
                data = content(c, p, off + 1000 * vma, scan)
                src.set_page(tasks[p], vma, off, data)
                if procs[tasks[p].pid].pages:
                    procs[tasks[p].pid].pages[layout[p][vma][off]] = data
        for p, s in spec["exits"].items():
            if s == scan and p in layout:
                src.kill(tasks[p])
                procs[tasks[p].pid].alive = False
        ksm.full_scan()
        c = ksm.counters()
        got.append({k: int(c[k]) for k in COUNTERS})
        want.append(ref.full_scan(procs))
    return got, want


@settings(max_examples=1000, deadline=None)  # about 10 s
@given(spec=specs)
def test_engine_equals_the_reference_after_every_scan(spec: dict[str, Any]) -> None:
    """Equal after every scan."""
    got, want = run_both(spec)
    assert got == want


def test_a_freed_dup_is_the_one_the_kernel_list_order_says() -> None:
    """Worked by hand (LKSM, max_page_sharing 4; `a` in 7 pages): round 2 merges P0's 3
    pages and P1's into dup N1 (full), P2's two into a new dup N2 - the chain's list is
    [N2, N1] (a new dup goes to the head) - and P3's page into N2 (3).  P1 exits: N1 has 3
    at the end of scan 3.  P0 exits and P2's zero page becomes `a`: scan 4 puts it into
    the first of the fullest dups with room in list order, N2 (4), then frees P0's
    three from N1, which goes: one KSM page, 3 sharing, a chain of one dup."""
    spec = {"policy": "lksm", "mps": 4, "zero": False, "filter": False,
            "procs": [([1, 1, 1], False, []), ([1], False, []), ([0, 1, 1], False, []), ([1], False, [])],
            "writes": [(3, 2, 0, 0, 1)], "exits": {1: 2, 0: 3}}
    got, want = run_both(spec)
    pick = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    assert [tuple(w[k] for k in pick) for w in want[1:4]] == [(2, 5, 1, 2), (2, 4, 1, 2), (1, 3, 1, 1)]
    assert got == want


def test_mainline_gates_a_changed_page_before_the_stable_tree_and_lksm_does_not() -> None:
    """Worked by hand (max_page_sharing 3): one process [0, b, b]; scan 2 pairs the b's
    (one KSM page, 1 sharing; the zero page waits unshared).  Page 0 is then written with
    b: LKSM (no gate from round 3) puts it into the KSM page at once (2 sharing);
    mainline's checksum gate comes first, so it waits a pass (volatile) and joins in the
    next one."""
    for policy, after_write in (("lksm", (1, 2, 0, 0)), ("ksm", (1, 1, 0, 1))):
        spec = {"policy": policy, "mps": 3, "zero": False, "filter": False, "procs": [([0, 2, 2], True, [])],
                "writes": [(2, 0, 0, 0, 2)], "exits": {}}
        got, want = run_both(spec)
        pick = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
        assert [tuple(w[k] for k in pick) for w in want[1:4]] == [(1, 1, 1, 0), after_write, (1, 2, 0, 0)], policy
        assert got == want, policy


def test_a_mature_region_scans_only_the_offsets_that_merged() -> None:
    """Worked by hand (LKSM_FILTER): p and q map F with `a` at offset 0 and a page of
    their own at offsets 1 and 2; each has an anonymous page of its own.  Round 2 merges
    the two `a` pages (bit 0 set); the four own pages of F and the two anonymous ones
    wait in the unstable tree.  F's region was made before round 1 began (round 0): from
    round 6 it is mature, and the scan visits offset 0 only - the items at offsets 1 and
    2 are freed as it passes them.  Both processes then write `b` at offset 1: without
    the filter the two pages merge in round 7; with it they are never scanned."""
    mine = UNIQUE
    spec = {"policy": "lksm", "mps": 256, "zero": False, "filter": True,
            "procs": [([mine], False, [1, mine, mine]), ([mine], False, [1, mine, mine])],
            "writes": [(6, 0, 1, 1, 2), (6, 1, 1, 1, 2)], "exits": {}}
    pick = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
    got, want = run_both(spec)
    assert [tuple(w[k] for k in pick) for w in want[4:7]] == [(1, 1, 6, 0), (1, 1, 2, 0), (1, 1, 2, 0)]
    assert got == want
    got, want = run_both({**spec, "filter": False})
    assert [tuple(w[k] for k in pick) for w in want[4:7]] == [(1, 1, 6, 0), (1, 1, 6, 0), (2, 2, 4, 0)]
    assert got == want


def test_among_equally_full_dups_the_head_of_the_chain_list_is_chosen() -> None:
    """Worked by hand (LKSM, max_page_sharing 2): round 2 makes dup B1 of P0's two `b`
    pages and dup B2 of P1's (the chain's list is [B2, B1]: stable_node_chain_add_dup()
    adds at the head); P2's `b` waits (both full).  Both processes rewrite their second
    page with `c`: in round 3 each leaves its dup (B1 and B2 hold one mapping each; the
    two `c` pages make C) and P2's page joins the first dup with room in list order, B2
    (the clock does not move, so stable_node_dup() never prunes and takes the first
    candidate; pruning, it would take the first of the equally full ones: B2 too).  P0
    exits: at the end of round 4 B1 loses its last mapping and goes, C keeps P1's.  Two
    KSM pages (B2 with 2 mappings, C with 1): 1 sharing, a chain of 1 dup.  Joining B1
    instead, P2's page would be left alone in it by P0's exit: 3 KSM pages, 0 sharing,
    2 dups."""
    spec = {"policy": "lksm", "mps": 2, "zero": False, "filter": False,
            "procs": [([2, 2], False, []), ([2, 2], False, []), ([2], False, [])],
            "writes": [(2, 0, 0, 1, 3), (2, 1, 0, 1, 3)], "exits": {0: 3}}
    got, want = run_both(spec)
    pick = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    assert [tuple(w[k] for k in pick) for w in want[1:4]] == [(2, 2, 1, 2), (3, 2, 1, 2), (2, 1, 1, 1)]
    assert got == want


@pytest.mark.parametrize(("p1", "writes", "scan2"), [
    # P1's own page first: its walk comes before its `a` pages leave D2 - the chain stays
    ([UNIQUE, 1, 1], [(2, 1, 0, 1, UNIQUE), (2, 1, 0, 2, UNIQUE)], (1, 1, 1, 2, 1, 1)),
    # P1's own page last: it walks after they left - the chain collapses in this pass
    ([1, 1, UNIQUE], [(2, 1, 0, 0, UNIQUE), (2, 1, 0, 1, UNIQUE)], (1, 1, 1, 2, 0, 0)),
])
def test_mainline_collapses_a_chain_left_with_one_dup_at_the_next_walk(
        p1: list[int], writes: list[tuple[int, int, int, int, int]], scan2: tuple[int, ...]) -> None:
    """Worked by hand (mainline, max_page_sharing 2): P0 holds two `a` pages, P1 two `a`
    pages and one of its own, all in one chunk.  Pass 2 merges P0's pair into dup D1
    and P1's pair into D2 (a chain of 2 dups), P1's own page waits unshared.  P1 then
    rewrites its `a` pages: in pass 3 each leaves D2 (remove_rmap_item_from_tree(),
    before the checksum gate, which it fails), and D2 goes with the second: the chain
    is left with D1 alone, full.  The one page that walks the stable tree in that pass
    is P1's own (stable_tree_search(): its chain_prune() reaches stable_node_dup(),
    which collapses a chain whose dup is alone, full or not): before the rewritten
    pages, the chain is still a chain of one at the pass's end; after them, it
    collapses.  Pass 4 walks again in both: no chain, P1's new pages unshared.  (The
    kernel also drops a dup whose page is freed when a walk meets it, so it collapses
    in pass 3 either way: it sees the rewrite before ksmd reaches the pages; the
    converged counters are the same.)"""
    spec = {"policy": "ksm", "mps": 2, "zero": False, "filter": False,
            "procs": [([1, 1], True, []), (p1, True, [])], "writes": writes, "exits": {}}
    got, want = run_both(spec)
    pick = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "stable_node_chains",
            "stable_node_dups")
    assert [tuple(w[k] for k in pick) for w in want[1:4]] == [(2, 2, 1, 0, 1, 2), scan2, (1, 1, 3, 0, 0, 0)]
    assert got == want


@pytest.mark.parametrize("policy", ["ksm", "lksm"])
def test_a_broken_merge_frees_its_room_at_its_own_visit(policy: str) -> None:
    """Worked by hand (max_page_sharing 2): one process, an anonymous page then, at higher
    addresses, two pages of F, all `a` by round 1, where F's two make KSM page K (full: 1
    shared, 1 sharing; the anonymous page was written before round 1, so it waits a round
    on its checksum).  Before round 2 F's first page is written with zeros (a COW break).
    In round 2 the anonymous page is visited first: K still counts the broken mapping
    (remove_rmap_item_from_tree() runs at that item's own visit, later in address order),
    so it is full and the page goes to the unstable tree; then the broken item leaves K.
    After round 2: K with 1 mapping (1 shared, 0 sharing) and the anonymous page waiting
    (1 unshared).  The zeroed page: mainline's checksum gate keeps it out (1 volatile);
    LKSM's gate holds only in its initial rounds, over by this third scan, so it waits in
    the unstable tree too (2 unshared).  Round 3 joins the anonymous page to K."""
    spec = {"policy": policy, "mps": 2, "zero": False, "filter": False,
            "procs": [([0], True, [1, 1])],
            "writes": [(1, 0, 0, 0, 1), (2, 0, 1, 0, 0)], "exits": {}}
    got, want = run_both(spec)
    pick = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
    after2 = (1, 0, 1, 1) if policy == "ksm" else (1, 0, 2, 0)
    assert tuple(want[2][k] for k in pick) == after2
    assert tuple(want[3][k] for k in pick)[:2] == (1, 1)
    assert got == want
