"""Mainline ksmd as the `ksm` policy (lksmfs.engine.ksmd): the rules of mm/ksm.c (6.x),
with counters worked out by hand in the comments."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.ksmd import KsmdPolicy, skip_age
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import VirtualClock

KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
BASE = 0x10000000


def counts(ksm: Ksm) -> tuple[int, ...]:
    c = ksm.counters()
    return tuple(c[k] for k in KEYS)


def proc(src: FakeSource, name: str, *areas: tuple[list[bytes], bool]) -> TaskId:
    """A process with one anonymous mapping per area (pages, madvised?), 1 MiB apart."""
    vmas = []
    for i, (pages, mg) in enumerate(areas):
        start = BASE + i * (1 << 20)
        vmas.append((Mapping(start, start + len(pages) * PAGE_SIZE, vm_mergeable=mg), dict(enumerate(pages))))
    return src.add(name, vmas)


def on_clock(src: FakeSource) -> tuple[Ksm, VirtualClock]:
    clock = VirtualClock()
    return Ksm(src, policy="ksm", clock=clock), clock


def mainline(src: FakeSource, *, smart_scan: int = 0, mps: int = 100000) -> Ksm:
    ksm = Ksm(src, policy="ksm")
    ksm.tunables.smart_scan = smart_scan
    ksm.tunables.max_page_sharing = mps
    return ksm


def test_only_vm_mergeable_memory_is_scanned() -> None:
    """prctl'd (every mapping mg) and madvised (one of two mappings mg) processes are
    registered; a process that asked for nothing is not, even with equal pages."""
    src = FakeSource()
    proc(src, "prctl", ([fill("a")] * 8, True), ([fill("b")] * 4, True))
    proc(src, "madvise", ([fill("a")] * 8, True), ([fill("b")] * 4, False))
    proc(src, "none", ([fill("a")] * 8, False))
    ksm = mainline(src)
    ksm.full_scan()
    ksm.full_scan()
    # 'a': 16 pages in two processes -> one KSM page, 15 sharing; 'b': only 4 scanned
    # (the madvised process's b mapping is not mg) -> one KSM page, 3 sharing
    assert counts(ksm) == (2, 15 + 3, 0, 0)
    assert ksm.counters()["rmap_items"] == 20
    assert len(ksm.slots) == 2


def test_checksum_gate_in_every_pass_and_before_the_stable_tree() -> None:
    """LTP ksm01's phases: every changed page needs one pass to show an unchanged
    checksum, even when a KSM page with its content exists already (LKSM after its
    initial rounds would merge at once)."""
    src = FakeSource()
    n = 64
    p1 = proc(src, "p1", ([fill("c")] * n, True))
    p2 = proc(src, "p2", ([fill("a")] * n, True))
    proc(src, "p3", ([fill("a")] * n, True))
    ksm = mainline(src)
    ksm.full_scan()  # first checksums: every item volatile
    assert counts(ksm) == (0, 0, 0, 3 * n)
    ksm.full_scan()  # c: 64 maps, a: 128 maps
    assert counts(ksm) == (2, 63 + 127, 0, 0)
    for rnd in range(3, 6):
        ksm.full_scan()
        assert counts(ksm) == (2, 190, 0, 0), rnd
    # p2 -> 'b': the writes broke 64 merges; the pass sees new checksums: volatile
    for off in range(n):
        src.set_page(p2, 0, off, fill("b"))
    ksm.full_scan()
    assert counts(ksm) == (2, 63 + 63, 0, n)
    assert ksm.last_scan["broken"] == n
    ksm.full_scan()
    assert counts(ksm) == (3, 63 * 3, 0, 0)
    # p1 -> 'a': a KSM page of 'a' exists, but the first pass only takes checksums
    for off in range(n):
        src.set_page(p1, 0, off, fill("a"))
    ksm.full_scan()
    assert counts(ksm) == (2, 63 + 63, 0, n)  # 'c' is gone (64 maps -> 0): 'a' and 'b' stay
    ksm.full_scan()
    assert counts(ksm) == (2, 127 + 63, 0, 0)  # p1's 64 pages joined 'a' (128 maps)
    assert ksm.counters()["full_scans"] == 9


def test_unique_pages_wait_in_the_unstable_tree_every_pass() -> None:
    src = FakeSource()
    proc(src, "p", ([unique(i) for i in range(10)], True))
    ksm = mainline(src)
    ksm.full_scan()
    assert counts(ksm) == (0, 0, 0, 10)
    for _ in range(3):
        ksm.full_scan()
        assert counts(ksm) == (0, 0, 10, 0)


# smart_scan, should_skip_rmap_item(): visit v (1-based) sees age v-1.  Ages 0..2: scanned.
# Then each scanned visit with no skips left grants skip_age(age) skips: visit 4 (age 3)
# -> 1, visit 6 (age 5) -> 2, visit 9 (age 8) -> 4, visit 14 (age 13) -> 8, visit 23 -> 8 ...
SKIPPED_VISITS = {5, 7, 8, 10, 11, 12, 13, *range(15, 23), *range(24, 32), *range(33, 41)}


def test_skip_age() -> None:
    ages = np.arange(0, 20, dtype=np.uint8)
    want = [1, 1, 1, 1, 2, 2, 4, 4, 4] + [8] * 11
    assert skip_age(ages).tolist() == want


def test_smart_scan_skips_a_page_that_keeps_failing_to_merge() -> None:
    """One unique page among 20 KSM pages: only the unique one ages and is skipped;
    a skipped page is not scanned and leaves the unstable tree (volatile)."""
    src = FakeSource()
    proc(src, "p", ([fill("a")] * 20 + [unique(7)], True))
    ksm = mainline(src, smart_scan=1)
    skipped = scanned = 0
    for visit in range(1, 41):
        ksm.full_scan()
        c = ksm.counters()
        skip = visit in SKIPPED_VISITS
        skipped += skip
        scanned += 21 - skip
        assert (c["pages_skipped"], c["pages_scanned"]) == (skipped, scanned), visit
        if visit >= 2:  # the 20 'a' pages merged in pass 2 (first pass: checksums)
            assert counts(ksm) == ((1, 19, 0, 1) if skip else (1, 19, 1, 0)), visit
    assert ksm.counters()["pages_skipped"] == len(SKIPPED_VISITS)


def test_smart_scan_off_never_skips_nor_ages() -> None:
    src = FakeSource()
    t = proc(src, "p", ([unique(i) for i in range(3)], True))
    ksm = mainline(src, smart_scan=0)
    for _ in range(12):
        ksm.full_scan()
    assert ksm.counters()["pages_skipped"] == 0
    assert ksm.slots[t].rmap.age.tolist() == [0, 0, 0]


def test_a_skipped_page_costs_no_budget() -> None:
    """pages_to_scan counts scanned pages: with 6 unique pages skipped (visit 5) and 4
    KSM pages, a batch of 5 visits all 10, scans the 4 KSM pages and still has budget
    when the cursor wraps: the pass ends in that batch."""
    src = FakeSource()
    proc(src, "p", ([unique(i) for i in range(6)] + [fill("k")] * 4, True))
    ksm, _ = on_clock(src)
    ksm.tunables.smart_scan = 1
    for _ in range(4):
        ksm.full_scan()
    assert ksm.crawler.prepare_full_scan() == 1
    ksm.scanner.wake()
    ksm.tunables.run = 1
    ksm.scan_batch(5)
    assert not ksm.scan_state  # the pass wrapped in this batch
    c = ksm.counters()
    assert (c["pages_skipped"], c["pages_scanned"], c["full_scans"]) == (6, 4 * 10 + 4, 5)


def drive(ksm: Ksm, clock: VirtualClock, until: float) -> list[tuple[float, int]]:
    """The daemon's two threads on the virtual clock: the crawler (pass preparation)
    and ksmd's batches every sleep_millisecs; returns (time, pages scanned) per batch."""
    batches = []
    next_batch = 0.0
    while clock.now < until:
        due = ksm.crawl(clock.now)
        if ksm.scanner_should_run() and clock.now >= next_batch:
            before = ksm.counters()["pages_scanned"]
            ksm.scan_batch()
            batches.append((round(clock.now, 6), ksm.counters()["pages_scanned"] - before))
            next_batch = clock.now + ksm.tunables.sleep_millisecs / 1000
            continue
        nxt = [t for t in (due, next_batch if ksm.scanner_should_run() else None) if t is not None]
        clock.now = max(clock.now + 1e-9, min(nxt)) if nxt else until
    return batches


def test_ksmd_batches_and_the_pass_that_wraps() -> None:
    """250 pages, pages_to_scan 100, sleep 20 ms: a pass is 3 batches (100, 100, 50 and
    the wrap); the next pass starts one sleep after the wrapping batch."""
    src = FakeSource()
    proc(src, "p", ([unique(i) for i in range(250)], True))
    ksm, clock = on_clock(src)
    table = AttributeTable(ksm)
    table.store("smart_scan", b"0\n")
    table.store("run", b"1\n")
    batches = drive(ksm, clock, 0.125)
    assert batches == [(0.0, 100), (0.02, 100), (0.04, 50), (0.06, 100), (0.08, 100), (0.1, 50),
                       (0.12, 100)]
    assert table.show("full_scans") == b"2\n"
    # 200 pages: the batch that scans the 200th page ends on its budget; the next one
    # finds the end of the list and wraps with nothing scanned
    src2 = FakeSource()
    proc(src2, "p", ([unique(i) for i in range(200)], True))
    ksm2, clock2 = on_clock(src2)
    ksm2.tunables.run = 1
    assert drive(ksm2, clock2, 0.065) == [(0.0, 100), (0.02, 100), (0.04, 0), (0.06, 100)]
    assert ksm2.counters()["full_scans"] == 1


def test_run_0_stops_mid_pass_and_run_1_goes_on() -> None:
    src = FakeSource()
    proc(src, "p", ([unique(i) for i in range(250)], True))
    ksm, clock = on_clock(src)
    table = AttributeTable(ksm)
    table.store("run", b"1\n")
    drive(ksm, clock, 0.03)  # two batches: 200 of 250 pages
    table.store("run", b"0\n")
    assert not ksm.scanner_should_run()
    assert drive(ksm, clock, 1.0) == []  # ksmd sleeps; the pass is not counted
    assert table.show("full_scans") == b"0\n"
    table.store("run", b"1\n")
    assert drive(ksm, clock, 1.01)[0] == (1.0, 50)  # the same pass, where it was
    assert table.show("full_scans") == b"1\n"


def test_run_2_unmerges_and_full_scans_start_again() -> None:
    src = FakeSource()
    proc(src, "p", ([fill("a")] * 8, True))
    proc(src, "q", ([fill("a")] * 8, True))
    ksm = mainline(src)
    table = AttributeTable(ksm)
    for _ in range(3):
        ksm.full_scan()
    assert counts(ksm) == (1, 15, 0, 0) and table.show("full_scans") == b"3\n"
    table.store("run", b"2\n")
    assert counts(ksm) == (0, 0, 0, 0)
    assert table.show("full_scans") == b"0\n"  # ksm_scan.seqnr = 0
    assert table.show("run") == b"2\n"
    table.store("run", b"0\n")  # run=2 is not scanning: stop, then scan again
    ksm.full_scan()
    ksm.full_scan()
    assert counts(ksm) == (1, 15, 0, 0) and table.show("full_scans") == b"2\n"


def test_registration_and_exit_between_passes() -> None:
    """A process that opts in is scanned from the next pass; one that exits loses its
    rmap_items at once (__ksm_exit: ksmd frees them on its next step)."""
    src = FakeSource()
    p = proc(src, "p", ([fill("a")] * 4, True))
    ksm = mainline(src)
    ksm.full_scan()
    ksm.full_scan()
    q = proc(src, "q", ([fill("a")] * 4, True))
    ksm.full_scan()  # q registered: its first checksums
    assert counts(ksm) == (1, 3, 0, 4)
    ksm.full_scan()
    assert counts(ksm) == (1, 7, 0, 0)
    assert list(ksm.slots) == [p, q]  # list order: new mms behind the cursor
    src.kill(p)
    ksm.task_exit(p)
    assert counts(ksm) == (1, 3, 0, 0)
    assert ksm.counters()["rmap_items"] == 4 and list(ksm.slots) == [q]


def test_the_attribute_set_is_mainlines() -> None:
    ksm = Ksm(FakeSource(), policy="ksm")
    assert isinstance(ksm.crawler, KsmdPolicy)
    table = AttributeTable(ksm)
    assert table.names() == [
        "sleep_millisecs", "pages_to_scan", "run", "pages_scanned", "pages_shared", "pages_sharing",
        "pages_unshared", "pages_volatile", "pages_skipped", "ksm_zero_pages", "full_scans",
        "merge_across_nodes", "max_page_sharing", "stable_node_chains", "stable_node_dups",
        "stable_node_chains_prune_millisecs", "use_zero_pages", "general_profit", "smart_scan",
        "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
        "advisor_target_scan_time",
    ]
    assert table.show("smart_scan") == b"1\n"  # mainline's default
    for name in ("one_shot_scanning", "scan_boost", "full_scan_interval", "region_share", "nr_regions",
                 "scanning_process"):
        assert name not in table
    for bad in (b"8\n", b"3\n", b"-1\n", b"x\n"):
        with pytest.raises(OSError) as ei:
            table.store("run", bad)
        assert ei.value.errno == errno.EINVAL
    assert table.show("run") == b"0\n"
    for bad in (b"2\n", b"maybe\n"):
        with pytest.raises(OSError) as ei:
            table.store("smart_scan", bad)
        assert ei.value.errno == errno.EINVAL
    table.store("smart_scan", b"n\n")
    assert table.show("smart_scan") == b"0\n"


def test_no_filter_and_no_hints_under_mainline() -> None:
    src = FakeSource()
    t = proc(src, "p", ([fill("a")] * 4, True))
    ksm = Ksm(src, policy="ksm", filter_enabled=True)
    assert not ksm.filter_enabled
    ksm.hint(t, True)  # no freezer hook in mainline: nothing changes
    assert not ksm.slots and ksm.crawler.prepare_partial_scan() == 0
    with pytest.raises(ValueError, match="policy must be one of lksm, ksm"):
        Ksm(src, policy="uksm")
