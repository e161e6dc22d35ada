"""Counters read at any moment of a scan (lksmfs issue 20, point 1).

mm/ksm.c changes its counters item by item as ksmd visits them: cmp_and_merge_page()
takes an rmap_item out of the unstable tree (remove_rmap_item_from_tree():
ksm_pages_unshared--) and puts it back (unstable_tree_search_insert():
ksm_pages_unshared++) within one call, and a new round empties the tree without
touching the items, which keep UNSTABLE_FLAG until visited.  So on memory that does not
change, every counter reads the same between any two batches of a scan.  The one rule
that moves pages_unshared on still memory is mainline's smart_scan:
should_skip_rmap_item() takes a skipped item out of the tree (remove_rmap_item_from_tree)
and it goes back only when a later pass scans it.

Here the engine is driven as the daemon drives it (crawler and scanner on a virtual
clock), in batches of 37 pages, and the counters are sampled after every batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import RMAP_ITEM_SIZE
from lksmfs.sources.base import PAGE_SIZE, Mapping
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import VirtualClock

BATCH = 37  # pages per batch: batches end inside VMAs, chunks and slots alike
PROCS = 4
ZERO, A, UNIQUE, B = 40, 50, 300, 20  # pages per process of each kind
KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "rmap_items", "ksm_zero_pages",
        "general_profit", "pages_skipped")


def workload() -> FakeSource:
    """Four processes: 30 zero-filled pages, 50 'a', 300 pages alike to none, 10 more
    zero-filled pages, 20 'b' (the zero pages split in two runs: two VMAs' worth of
    order in one mapping)."""
    src = FakeSource()
    for p in range(PROCS):
        pages = ([fill(0)] * 30 + [fill("a")] * A + [unique(1 + 1000 * p + i) for i in range(UNIQUE)]
                 + [fill(0)] * (ZERO - 30) + [fill("b")] * B)
        m = Mapping(0x10000000, 0x10000000 + len(pages) * PAGE_SIZE, vm_mergeable=True)
        src.add(f"p{p}", [(m, dict(enumerate(pages)))])
    return src


def by_hand(use_zero_pages: int) -> dict[str, int]:
    """The converged counters, max_page_sharing 256: each content of several pages is one
    KSM page (160 zero-filled, 200 'a', 80 'b' pages: all under 256), the rest of its
    pages sharing it; the 1200 unique pages wait in the unstable tree.  With
    use_zero_pages the zero-filled pages go to the zero page instead, and their rmap
    items are freed when the next scan passes them (the zero page is not anonymous)."""
    items = PROCS * (ZERO + A + UNIQUE + B)
    shared, sharing, zero = 3, PROCS * (ZERO + A + B) - 3, 0
    if use_zero_pages:
        items -= PROCS * ZERO
        shared, sharing, zero = 2, PROCS * (A + B) - 2, PROCS * ZERO
    return {
        "pages_shared": shared, "pages_sharing": sharing, "pages_unshared": PROCS * UNIQUE,
        "pages_volatile": 0, "rmap_items": items, "ksm_zero_pages": zero,
        "general_profit": (sharing + zero) * PAGE_SIZE - items * RMAP_ITEM_SIZE,
    }


def engine(policy: str, use_zero_pages: int, smart_scan: int = 0) -> tuple[Ksm, AttributeTable, VirtualClock]:
    clock = VirtualClock()
    ksm = Ksm(workload(), policy=policy, clock=clock, short_task_ms=0)
    table = AttributeTable(ksm)
    table.store("use_zero_pages", f"{use_zero_pages}\n".encode())
    if policy == "ksm":
        table.store("smart_scan", f"{smart_scan}\n".encode())
        table.store("sleep_millisecs", b"0\n")
    return ksm, table, clock


def batches(ksm: Ksm, clock: VirtualClock, until_full_scans: int, bound: int = 20_000) -> Iterator[None]:
    """Crawler and scanner as the daemon's threads run them, BATCH pages a batch; yields
    after every batch until full_scans reaches `until_full_scans`."""
    for _ in range(bound):
        if ksm.counters()["full_scans"] >= until_full_scans:
            return
        if ksm.scanner_should_run():
            ksm.scan_batch(BATCH)
            yield
            continue
        due = ksm.crawl(clock.now)
        if not ksm.scanner_should_run():
            assert due is not None, "nothing scheduled before the scans asked for"
            clock.now = max(clock.now, due)
    raise AssertionError("the scans did not end")


def start(ksm: Ksm, table: AttributeTable, policy: str) -> int:
    """run=8 (LKSM: its three initial full scans) or run=1 (ksmd: passes until run=0);
    returns the full scans to wait for: LKSM's initial ones, or mainline's 4 passes
    (the checksum gate: a page joins the unstable tree at its second visit)."""
    table.store("run", b"8\n" if policy == "lksm" else b"1\n")
    return 3 if policy == "lksm" else 4


def more_scans(ksm: Ksm, table: AttributeTable, policy: str) -> None:
    """LKSM scans on request (a full one-shot scan); mainline's ksmd goes on by itself."""
    if policy == "lksm":
        table.store("one_shot_scanning", b"2\n")


def per_process_zero(ksm: Ksm) -> list[int]:
    return [int(r["zero_pages"]) for r in ksm.per_process()]


@pytest.mark.parametrize("use_zero_pages", [0, 1])
@pytest.mark.parametrize("policy", ["lksm", "ksm"])
def test_counters_never_move_during_scans_of_still_memory(policy: str, use_zero_pages: int) -> None:
    """Once converged, every counter and every process's figures read the same after
    every batch of the next scans as at their end."""
    ksm, table, clock = engine(policy, use_zero_pages)
    converged = start(ksm, table, policy)
    for _ in batches(ksm, clock, converged):
        pass
    want = by_hand(use_zero_pages)
    got = ksm.counters()
    assert {k: got[k] for k in want} == want
    rows = [{k: v for k, v in r.items() if k not in ("state", "nr_merged_window")} for r in ksm.per_process()]
    assert per_process_zero(ksm) == [ZERO * use_zero_pages] * PROCS
    seen = 0
    for rnd in range(3):
        more_scans(ksm, table, policy)
        for _ in batches(ksm, clock, converged + 1 + rnd):
            got = ksm.counters()
            assert {k: got[k] for k in want} == want, f"after batch {seen}"
            assert got["pages_skipped"] == 0
            now = [{k: v for k, v in r.items() if k not in ("state", "nr_merged_window")}
                   for r in ksm.per_process()]
            assert now == rows, f"after batch {seen}"
            seen += 1
    # each scan of 1640 (or 1480) pages is over 40 batches of 37
    assert seen >= 3 * 40


@pytest.mark.parametrize("use_zero_pages", [0, 1])
@pytest.mark.parametrize("policy", ["lksm", "ksm"])
def test_per_process_figures_add_up_while_pages_merge(policy: str, use_zero_pages: int) -> None:
    """The kernel counts per mm as it counts globally, item by item: mm->ksm_rmap_items
    with ksm_rmap_items (alloc_rmap_item / free_rmap_item), mm->ksm_merging_pages with
    pages_shared + pages_sharing (stable_tree_append / remove_rmap_item_from_tree),
    mm->ksm_zero_pages with ksm_zero_pages.  So after every batch of the scans that
    build the rmap lists and merge the pages, the processes' figures add up to the
    global ones - the slot being scanned included, whose list is half rebuilt."""
    ksm, table, clock = engine(policy, use_zero_pages)
    zeros = set()
    merging = set()
    for _ in batches(ksm, clock, start(ksm, table, policy)):
        got = ksm.counters()
        rows = ksm.per_process()
        assert sum(int(r["rmap_items"]) for r in rows) == got["rmap_items"]
        assert sum(int(r["merging_pages"]) for r in rows) == got["pages_shared"] + got["pages_sharing"]
        assert sum(int(r["zero_pages"]) for r in rows) == got["ksm_zero_pages"]
        zeros.add(got["ksm_zero_pages"])
        merging.add(got["pages_shared"] + got["pages_sharing"])
    want = by_hand(use_zero_pages)
    assert max(zeros) == want["ksm_zero_pages"]
    assert max(merging) == want["pages_shared"] + want["pages_sharing"]
    assert len(merging) > 2  # they did merge batch by batch, not all at once
    if use_zero_pages:
        assert len(zeros) > 2


def test_smart_scan_takes_skipped_pages_out_of_the_unstable_tree() -> None:
    """Mainline with smart_scan: should_skip_rmap_item() removes a skipped item from the
    unstable tree (ksm_pages_unshared--, so it reads as volatile) until a pass scans it
    again.  The 1200 unique pages age together: from their 4th visit on they are skipped
    in some passes, so pages_unshared falls to 0 across such a pass and climbs back to
    1200 across the next scanned one; KSM pages are never skipped (pages_shared and
    pages_sharing never move) and no item is freed (unshared + volatile stays 1200)."""
    ksm, table, clock = engine("ksm", 0, smart_scan=1)
    for _ in batches(ksm, clock, start(ksm, table, "ksm")):
        pass
    want = by_hand(0)
    unshared = set()
    for _ in batches(ksm, clock, 30):
        got = ksm.counters()
        assert (got["pages_shared"], got["pages_sharing"]) == (want["pages_shared"], want["pages_sharing"])
        assert got["pages_unshared"] + got["pages_volatile"] == PROCS * UNIQUE
        assert got["rmap_items"] == want["rmap_items"]
        unshared.add(got["pages_unshared"])
    assert min(unshared) == 0 and max(unshared) == PROCS * UNIQUE
    assert ksm.counters()["pages_skipped"] > 0
