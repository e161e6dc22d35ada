"""The crawler's policy (lksm_crawl_thread and the prepare functions) on a virtual clock."""

from __future__ import annotations

import errno

import pytest
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import KSM_MM_FROZEN, KSM_MM_NEWCOMER
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import Driver, VirtualClock


def booted(src: FakeSource, run: bytes = b"8\n") -> tuple[Ksm, AttributeTable, VirtualClock, list[dict]]:
    """An engine after `echo 8 > run` and its initial rounds."""
    clock = VirtualClock()
    ksm = Ksm(src, clock=clock)
    table = AttributeTable(ksm)
    scans: list[dict] = []
    table.store("run", run)
    if run == b"8\n":
        Driver(ksm, clock, on_scan=lambda _: scans.append(dict(ksm.last_scan))).settle()
        return ksm, table, clock, scans
    # periodic mode never idles: step until the initial rounds are done
    for _ in range(1000):
        if ksm.scanner_should_run():
            ksm.scan_batch()
            if not ksm.scan_state:
                scans.append(dict(ksm.last_scan))
            continue
        if ksm.counters()["full_scans"] >= 3:
            break
        nxt = ksm.crawl(clock.now)
        clock.now = max(clock.now, nxt if nxt is not None else clock.now)
    assert ksm.counters()["full_scans"] == 3
    return ksm, table, clock, scans


def three(src: FakeSource) -> list:
    return [src.anon(f"p{i}", [fill("a"), unique(i)]) for i in range(3)]


def test_initial_rounds_are_three_full_scans_a_second_apart() -> None:
    src = FakeSource()
    three(src)
    ksm, table, clock, scans = booted(src)
    assert [s["mode"] for s in scans] == [2, 2, 2]
    assert table.show("full_scans") == b"3\n"
    assert table.show("full_scan_interval") == b"60000\n"
    assert clock.now >= 2.0  # scans at t=0, 1, 2
    assert table.show("run") == b"8\n"
    assert table.show("one_shot_scanning") == b"0\n"


def test_full_scan_interval_is_100_until_the_crawler_starts() -> None:
    ksm = Ksm(FakeSource())
    assert AttributeTable(ksm).show("full_scan_interval") == b"100\n"


def test_one_shot_write_while_pending_is_einval() -> None:
    src = FakeSource()
    three(src)
    ksm = Ksm(src)
    table = AttributeTable(ksm)  # run=0: nothing consumes the request
    table.store("one_shot_scanning", b"1\n")
    with pytest.raises(OSError) as e:
        table.store("one_shot_scanning", b"2\n")
    assert e.value.errno == errno.EINVAL
    assert table.show("one_shot_scanning") == b"1\n"


def test_partial_request_with_nothing_to_scan_reads_0_at_once() -> None:
    src = FakeSource()
    three(src)
    ksm, table, clock, scans = booted(src)
    table.store("one_shot_scanning", b"1\n")
    Driver(ksm, clock, on_scan=lambda _: scans.append(dict(ksm.last_scan))).settle()
    # no frozen task, no newcomer, and every VIP's fault count is unchanged
    assert len(scans) == 3
    assert table.show("one_shot_scanning") == b"0\n"


def test_partial_scan_takes_frozen_tasks_and_vips_whose_faults_moved() -> None:
    src = FakeSource()
    p0, p1, p2 = three(src)
    ksm, table, clock, scans = booted(src)
    # the merge window counts sharing merges of the slot being scanned: p0 only
    # provided the first 'a' (pages_shared), p1 and p2 merged into it
    assert set(ksm.mm.vips) == {ksm.slots[p].sid for p in (p1, p2)}
    src.set_page(p0, 0, 1, unique(50))  # p0 faults, but it is no VIP
    src.set_page(p1, 0, 1, unique(51))  # p1 faults
    ksm.hint(p2, True)  # p2 goes to the background
    assert ksm.slots[p2].state & KSM_MM_FROZEN
    table.store("scan_boost", b"500\n")
    table.store("one_shot_scanning", b"1\n")
    # the crawler batches frozen events for 100 ms before preparing
    assert ksm.crawl(clock.now) == pytest.approx(clock.now + 0.1)
    clock.now += 0.1
    ksm.crawl(clock.now)
    assert ksm.scan_state and ksm.scanner.scan_mode == 1
    ksm.scan_batch(1)  # one page: the scan is still running
    assert table.show("pages_to_scan") == b"500\n"  # boosted for the partial scan
    Driver(ksm, clock, on_scan=lambda _: scans.append(dict(ksm.last_scan))).settle()
    assert scans[-1]["mode"] == 1 and scans[-1]["slots_scanned"] == 2  # p2 (frozen) and p1 (VIP)
    assert table.show("pages_to_scan") == b"100\n"  # back to the default
    assert table.show("one_shot_scanning") == b"0\n"
    assert table.show("full_scans") == b"3\n"  # partial scans are not full scans


def test_newcomer_is_picked_by_a_partial_scan() -> None:
    src = FakeSource()
    three(src)
    ksm, table, clock, scans = booted(src)
    late = src.anon("late", [fill("a")] * 2)
    table.store("one_shot_scanning", b"1\n")
    clock.now += 0.1
    Driver(ksm, clock, on_scan=lambda _: scans.append(dict(ksm.last_scan))).settle()
    assert scans[-1]["mode"] == 1 and scans[-1]["slots_scanned"] == 1
    assert not ksm.slots[late].state & KSM_MM_NEWCOMER
    # no checksum gate any more: both of its 'a' pages joined the KSM page at once
    assert table.show("pages_sharing") == b"4\n"


def test_full_request_scans_everyone_and_counts() -> None:
    src = FakeSource()
    three(src)
    ksm, table, clock, scans = booted(src)
    table.store("one_shot_scanning", b"2\n")
    Driver(ksm, clock, on_scan=lambda _: scans.append(dict(ksm.last_scan))).settle()
    assert scans[-1]["mode"] == 2 and scans[-1]["slots_scanned"] == 3
    assert table.show("full_scans") == b"4\n"
    assert table.show("one_shot_scanning") == b"0\n"


def test_periodic_mode_runs_a_partial_scan_on_a_frozen_event() -> None:
    src = FakeSource()
    _, p1, _ = three(src)
    ksm, table, clock, scans = booted(src, run=b"1\n")
    n = len(scans)
    ksm.hint(p1, True)
    due = ksm.crawl(clock.now)
    assert due == pytest.approx(clock.now + 0.1)
    clock.now = due
    ksm.crawl(clock.now)
    while ksm.scanner_should_run():
        ksm.scan_batch()
    assert ksm.last_scan["mode"] == 1 and ksm.last_scan["slots_scanned"] == 1
    assert len(scans) == n
    # and the next full scan comes full_scan_interval later
    assert ksm.crawl(clock.now) <= clock.now + 60


def test_thawed_before_scan_goes_back_to_listed() -> None:
    src = FakeSource()
    _, p1, _ = three(src)
    ksm, table, clock, scans = booted(src)
    ksm.hint(p1, True)
    ksm.hint(p1, False)
    slot = ksm.slots[p1]
    assert not slot.state & KSM_MM_FROZEN
    assert slot not in ksm.mm.scan_list  # it was already scanned: off the list again


def test_run_0_stops_and_keeps_merges() -> None:
    src = FakeSource()
    three(src)
    ksm, table, clock, scans = booted(src)
    before = table.show("pages_sharing")
    table.store("run", b"0\n")
    table.store("one_shot_scanning", b"2\n")
    assert ksm.crawl(clock.now) is None
    assert not ksm.scanner_should_run()
    assert table.show("pages_sharing") == before == b"2\n"


def test_run_0_during_the_initial_rounds_puts_the_crawler_to_sleep() -> None:
    src = FakeSource()
    three(src)
    clock = VirtualClock()
    ksm = Ksm(src, clock=clock)
    table = AttributeTable(ksm)
    table.store("run", b"8\n")
    ksm.crawl(clock.now)  # the first initial full scan is prepared
    while ksm.scanner_should_run():
        ksm.scan_batch()
    table.store("run", b"0\n")
    clock.now += 5
    assert ksm.crawl(clock.now) is None  # no busy loop: it waits for a store
    assert table.show("full_scans") == b"1\n"
    table.store("run", b"8\n")  # and picks up where it was
    Driver(ksm, clock).settle()
    assert table.show("full_scans") == b"3\n"


def test_periodic_crawler_with_nothing_to_scan_does_not_spin() -> None:
    clock = VirtualClock()
    ksm = Ksm(FakeSource(), clock=clock)
    table = AttributeTable(ksm)
    table.store("run", b"1\n")
    for _ in range(4):  # the initial rounds find nobody
        due = ksm.crawl(clock.now)
        clock.now = max(clock.now, due if due is not None else clock.now)
    table.store("full_scan_interval", b"0\n")
    for _ in range(3):
        due = ksm.crawl(clock.now)
        assert due is not None and due >= clock.now + 1.0  # crawler_sleep, not "now"
        clock.now = due
    assert table.show("full_scans") == b"0\n"
