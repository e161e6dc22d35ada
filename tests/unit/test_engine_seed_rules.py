"""The seed's LKSM_FILTER and scan rules where a first port got them wrong (issue 8).

Each test quotes the seed function it follows; the expected counters and region_share
are worked out by hand in the comments.
"""

from __future__ import annotations

import dataclasses

from drive import booted, settle
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import LKSM_SCAN_FULL, LKSM_SCAN_NONE
from lksmfs.engine.regions import RegionType
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.workload.driver import VirtualClock

F = (1, 100)  # a library whose .data is mapped at different sizes
G = (1, 200)


def lib_data(src: FakeSource, name: str, base: int, npages: int, pages: dict[int, bytes]) -> TaskId:
    """A process whose only mapping is a private, written file mapping of F."""
    m = Mapping(base, base + npages * PAGE_SIZE, "rw-p", F, "/lib/libF.so")
    return src.add(name, [(m, pages)])


def share(ksm: Ksm) -> dict[str, int]:
    return ksm.region_share()


def frozen_full_scan(ksm: Ksm, tasks: list[TaskId]) -> None:
    """Frozen newcomers skip the checksum gate: contents merge in this very scan.  They
    are scanned in the order of `tasks`: the frozen task list is taken from its head,
    where lksm_task_frozen() adds (the last frozen first), so they are frozen in reverse."""
    for t in reversed(tasks):
        ksm.hint(t, True)
    ksm.full_scan()


# -- lksm_find_next_vma(): the size check runs for every page the scanner visits ------


def test_smaller_mapping_conflicts_on_its_second_visited_page_in_the_same_scan() -> None:
    """lksm_find_next_vma() re-runs the size check on the cached VMA each time
    __scan_next_rmap_item() is called, i.e. before every page it returns.

    p maps F's .data over 200 pages: ksm_join registers region R with a 4-word filter.
    q maps it over 100 pages (2 words): never resized, each check is one more conflict.
      q page 0 ('a'): check 1 -> conflict 1, R still file_data: merges with p's 'a'
                      (p's item is in R): file_data += 2
      q page 1 ('b'): check 2 -> conflict 2 -> R conflicted, ksm_scan.region still R:
                      merges with p's 'b' (R): conflicted += 2
      q page 2 ('c'): check 3 -> R is conflicted -> unknown region: merges with p's 'c'
                      (its item points to R, conflicted): conflicted += 1, unknown += 1
    """
    src = FakeSource()
    pages = {0: fill("a"), 1: fill("b"), 2: fill("c")}
    p = lib_data(src, "p", 0x1000000, 200, pages)
    q = lib_data(src, "q", 0x4000000, 100, pages)
    ksm = Ksm(src)
    frozen_full_scan(ksm, [p, q])
    region = ksm.regions.get(ksm.regions.by_key[F])
    assert region.type == RegionType.CONFLICT and region.conflict == 2
    assert share(ksm) == {
        "heap": 0, "stack": 0, "file_data": 2, "file_bss": 0, "conflicted": 3, "unknown": 1,
    }
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["nr_regions"]) == (3, 3, 1)


def test_smaller_mapping_with_one_page_conflicts_when_the_vma_is_exhausted() -> None:
    """With a single present page the second check is the call that finds the VMA
    exhausted: the page itself was still accounted to file_data, but R is conflicted
    when the scan ends (2 file_data merges, 0 conflicted)."""
    src = FakeSource()
    p = lib_data(src, "p", 0x1000000, 200, {0: fill("a")})
    q = lib_data(src, "q", 0x4000000, 100, {0: fill("a")})
    ksm = Ksm(src)
    frozen_full_scan(ksm, [p, q])
    assert ksm.regions.get(ksm.regions.by_key[F]).type == RegionType.CONFLICT
    assert (share(ksm)["file_data"], share(ksm)["conflicted"], share(ksm)["unknown"]) == (2, 0, 0)


def test_larger_mapping_resizes_once_and_never_conflicts_by_itself() -> None:
    """A larger mapping: the first check resizes the filter (conflict 1), every later
    check finds the lengths equal.  All 3 merges of q stay file_data: 6 in all."""
    src = FakeSource()
    pages = {0: fill("a"), 1: fill("b"), 2: fill("c")}
    p = lib_data(src, "p", 0x1000000, 100, pages)
    q = lib_data(src, "q", 0x4000000, 200, pages)
    ksm = Ksm(src)
    frozen_full_scan(ksm, [p, q])
    region = ksm.regions.get(ksm.regions.by_key[F])
    assert (region.type, region.conflict, region.len) == (RegionType.FILE1, 1, 4)
    assert (share(ksm)["file_data"], share(ksm)["conflicted"]) == (6, 0)


# -- ksm_join(): a VMA registers its region once, when it is first marked -------------


def test_mapping_that_gets_anon_pages_after_the_join_is_never_a_region() -> None:
    """ksm_join() skips VMAs that are already VM_MERGEABLE, and registers a region only
    for a VMA with an anon_vma at that moment.  p and q map G's .data without having
    written it when they join; later they write the same page there.  Nobody ever
    registered G, so lksm_find_region() finds no region: both mappings of the merge
    count as unknown, and nr_regions stays 0 however many scans follow."""
    src = FakeSource()
    tasks = []
    for name, base in (("p", 0x1000000), ("q", 0x4000000)):
        m = Mapping(base, base + 4 * PAGE_SIZE, "rw-p", G, "/lib/libG.so", has_anon=False)
        tasks.append(src.add(name, [(m, {})]))
    ksm = Ksm(src)
    frozen_full_scan(ksm, tasks)
    assert ksm.counters()["nr_regions"] == 0
    for t in tasks:  # the first write: an anon_vma, and an anonymous page
        vma = src.procs[t].vmas[0]
        vma.mapping = dataclasses.replace(vma.mapping, has_anon=True)
        src.set_page(t, 0, 0, fill("g"))
    for _ in range(3):
        ksm.full_scan()
    assert ksm.counters()["nr_regions"] == 0
    assert (share(ksm)["file_data"], share(ksm)["unknown"]) == (0, 2)
    assert ksm.counters()["pages_sharing"] == 1


def test_regions_are_registered_once_per_vma_not_per_scan() -> None:
    """Every prepare calls ksm_join() for every process; only VMAs not yet marked
    register.  A region whose last reference went is freed; a VMA that was already
    marked does not bring it back, so nr_regions counts one region, scan after scan."""
    src = FakeSource()
    p = lib_data(src, "p", 0x1000000, 8, {0: fill("a"), 1: unique(1)})
    lib_data(src, "q", 0x4000000, 8, {0: fill("a"), 1: unique(2)})
    ksm = Ksm(src)
    for _ in range(4):
        ksm.full_scan()
    assert ksm.counters()["nr_regions"] == 1
    assert len(ksm.slots[p].regions) == 1


# -- lksm_scan_wrapup_wait(): exited slots are freed by the scanner only --------------


def test_exited_slot_waits_for_a_real_scan_to_be_freed() -> None:
    """__ksm_exit() moves a slot with rmap items to remove_mm_list; the scanner frees
    that list when it wraps a scan up (lksm_flush_removed_mm_list).  A one-shot request
    that finds no one to scan never wakes the scanner, so q's 2 mappings stay counted
    until the next scan that really runs."""
    src = FakeSource()
    p = src.anon("p", [fill("a")] * 2)
    q = src.anon("q", [fill("a")] * 2)
    ksm, table, clock = booted(src)
    assert (ksm.counters()["pages_shared"], ksm.counters()["pages_sharing"]) == (1, 3)
    src.kill(q)
    table.store("one_shot_scanning", b"1\n")  # no frozen task, no newcomer, no fault
    settle(ksm, clock)
    c = ksm.counters()
    assert table.show("one_shot_scanning") == b"0\n"
    assert c["scanning_process"] == 1  # the exit was seen ...
    assert (c["pages_shared"], c["pages_sharing"]) == (1, 3)  # ... but q is not freed yet
    assert [s.task for s in ksm.mm.remove_list] == [q]
    table.store("one_shot_scanning", b"2\n")  # a full scan of p wraps up: q goes
    settle(ksm, clock)
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["rmap_items"]) == (1, 1, 2)
    assert not ksm.mm.remove_list and list(ksm.slots) == [p]


# -- lksm_scan_thread(): run=0 in the middle of a scan wraps it up ------------------


def test_run_0_mid_scan_wraps_up_counts_and_the_request_resumes_under_run_8() -> None:
    """run=0: !ksmd_should_run(), so lksm_scan_thread() takes its "wait for activating
    ksm" path: lksm_flush_removed_mm_list() + lksm_scan_wrapup_wait(), which counts the
    full scan but leaves one_shot_scanning alone (ksm_run has no ONESHOT bit).  The
    cursor and the scan list stay: when run is 8 again the crawler prepares the pending
    full request, which queues nobody new (everyone is queued or under the cursor), and
    the scanner goes on from the page where it stopped.

    3 processes of 2 pages: 1 page before run=0, the 5 others after: 6 pages in all."""
    src = FakeSource()
    for i in range(3):
        src.anon(f"p{i}", [fill("a"), unique(i)])
    ksm, table, clock = booted(src)
    scanned0 = ksm.counters()["pages_scanned"]
    table.store("one_shot_scanning", b"2\n")
    ksm.crawl(clock.now)
    assert ksm.scan_state
    ksm.scan_batch(1)
    table.store("run", b"0\n")
    assert ksm.scanner_should_run()  # the scanner must come round to wrap it up
    ksm.scan_batch()
    assert not ksm.scan_state
    assert table.show("full_scans") == b"4\n"
    assert table.show("one_shot_scanning") == b"2\n"  # still pending
    assert ksm.counters()["pages_scanned"] == scanned0 + 1
    table.store("run", b"8\n")
    settle(ksm, clock)
    assert table.show("one_shot_scanning") == b"0\n"
    assert table.show("full_scans") == b"5\n"
    assert ksm.counters()["pages_scanned"] == scanned0 + 6
    assert ksm.tunables.one_shot_scanning == LKSM_SCAN_NONE
    assert ksm.last_scan["mode"] == LKSM_SCAN_FULL


# -- stable_node_dup() of Linux 5.4: a chain collapses only onto a dup with room ------


def test_chain_collapses_only_when_its_last_dup_has_room() -> None:
    """max_page_sharing 2.  p0+p1 form KSM page A (2 mappings: full); p2+p3 merge in
    the unstable tree and stable_tree_insert() chains B beside A: 1 chain, 2 dups.
    p2 and p3 exit: B goes.  The chain has one dup, A, which is full: Linux 5.4's
    stable_node_dup() (LKSM's base) collapses a chain only onto a dup that is a sharing
    candidate, so it stays a chain of 1 (mainline 6.11+ collapses it: see
    test_stable_node_dup.py).  p1 exits: A has room, and the next prune collapses it."""
    src = FakeSource()
    ps = [src.anon(f"p{i}", [fill("q")]) for i in range(4)]
    clock = VirtualClock()
    ksm = Ksm(src, clock=clock)
    ksm.tunables.max_page_sharing = 2
    ksm.tunables.stable_node_chains_prune_millisecs = 0

    def chains() -> tuple[int, int, int, int]:
        c = ksm.counters()
        return c["stable_node_chains"], c["stable_node_dups"], c["pages_shared"], c["pages_sharing"]

    ksm.full_scan()
    ksm.full_scan()
    assert chains() == (1, 2, 2, 2)
    src.kill(ps[2])
    src.kill(ps[3])
    ksm.full_scan()  # their items go when this scan wraps up
    ksm.full_scan()  # and the prune at this scan's start finds A alone, but full
    assert chains() == (1, 1, 1, 1)
    src.kill(ps[1])
    ksm.full_scan()
    ksm.full_scan()
    assert chains() == (0, 0, 1, 0)
