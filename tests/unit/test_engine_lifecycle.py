"""The seed's process lifecycle on the virtual clock (issue 20, points 2.1-2.6).

Each test cites the seed function it is written from (002_a3a1b2fcd7996b55 unless
marked 000, the LKSM_FILTER patch); expected values are worked out by hand in the
comments.  The same rules through a real mount, on real processes: tests/live/
test_lifecycle_live.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from drive import booted, settle
from memfake import FakeProc, FakeSource, FakeVma, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import KSM_MM_LISTED, KSM_MM_NEWCOMER, KSM_MM_SCANNED, LKSM_SCAN_FULL
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import VirtualClock


def request(table: AttributeTable, mode: int) -> None:
    table.store("one_shot_scanning", f"{mode}\n".encode())


def show(table: AttributeTable, name: str) -> int:
    return int(table.show(name))


def pages(table: AttributeTable) -> tuple[int, int, int, int]:
    return tuple(show(table, n) for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))  # type: ignore[return-value]


def imaged(src: FakeSource, task: TaskId, image: int = 7) -> TaskId:
    """The task as procfs lists it: with the image of its program (FakeSource's are 0,
    unknown: never compared)."""
    proc = src.procs.pop(task)
    proc.task = TaskId(task.pid, task.start_time, image)
    src.procs[proc.task] = proc
    return proc.task


def exec_(src: FakeSource, task: TaskId, new_pages: list[bytes]) -> TaskId:
    """execve(): the same pid and start time, a new image and a new mm; the CPU time
    (sum_exec_runtime) carries over."""
    old = src.procs.pop(task)
    new = TaskId(task.pid, task.start_time, task.image + 1)
    m = Mapping(0x20000000, 0x20000000 + len(new_pages) * PAGE_SIZE)
    src.procs[new] = FakeProc(new, old.comm, [FakeVma(m, dict(enumerate(new_pages)))], old.runtime_ns)
    return new


# -- 1. exit: __ksm_exit -> lksm_remove_mm_slot, freed by lksm_flush_removed_mm_list ----


def test_exit_drops_scanning_process_at_once_and_the_pages_at_the_scans_end() -> None:
    """__ksm_exit(): `ksm_nr_added_process--` at once; the slot, which has rmap items,
    goes to remove_mm_list (lksm_remove_mm_slot) and its items leave the trees only in
    lksm_flush_removed_mm_list() at the scan's end.

    a and b map 'x','y' each: after the initial rounds two KSM pages, each mapped twice:
    pages_shared 2, pages_sharing 2.  b exits: scanning_process 2 -> 1, the page
    counters as they were.  The next full scan frees b's items: each KSM page keeps a's
    one mapping (a KSM page mapped once: shared 2, sharing 0)."""
    src = FakeSource()
    a = src.anon("a", [fill("x"), fill("y")])
    b = src.anon("b", [fill("x"), fill("y")])
    ksm, table, clock = booted(src)
    assert pages(table) == (2, 2, 0, 0) and show(table, "scanning_process") == 2
    regions = show(table, "nr_regions")
    src.kill(b)
    ksm.task_exit(b)
    assert show(table, "scanning_process") == 1
    assert pages(table) == (2, 2, 0, 0)  # b's items wait on the remove list
    assert [s.task for s in ksm.mm.remove_list] == [b]
    request(table, 2)
    settle(ksm, clock)
    assert pages(table) == (2, 0, 0, 0)
    assert show(table, "scanning_process") == 1 and not ksm.mm.remove_list
    assert show(table, "nr_regions") == regions  # lksm_region_free (000): never decremented
    assert set(ksm.slots) == {a}


def test_exit_of_the_slot_under_the_scanners_cursor_is_counted_once_at_once() -> None:
    """__ksm_exit() decrements ksm_nr_added_process whether or not the slot is
    ksm_scan.mm_slot; only the list moves are left to the scanner, which meets the exit
    (ksm_test_exit) at its next step and moves the slot to remove_mm_list."""
    src = FakeSource()
    src.anon("a", [unique(i) for i in range(8)])
    b = src.anon("b", [unique(100 + i) for i in range(8)])
    ksm, table, clock = booted(src)
    request(table, 2)
    ksm.crawl(clock.now)  # prepared: a, then b
    while ksm.cur is None or ksm.cur.task != b:
        ksm.scan_batch(3)
    ksm.scan_batch(3)  # in the middle of b
    assert ksm.cur is not None and ksm.cur.task == b
    src.kill(b)
    ksm.task_exit(b)
    assert show(table, "scanning_process") == 1  # at once, the cursor's slot too
    settle(ksm, clock)
    assert show(table, "scanning_process") == 1 and ksm.counters()["tasks_exited"] == 1
    assert b not in ksm.slots and not ksm.mm.remove_list
    assert ksm.counters()["rmap_items"] == 8  # a's pages only
    ksm.task_exit(b)  # told twice (watcher and scanner): one exit
    assert show(table, "scanning_process") == 1 and ksm.counters()["tasks_exited"] == 1


def test_exit_of_a_task_on_the_frozen_task_list_drops_its_hint() -> None:
    """ksm_exit() -> lksm_remove_candidate() for an unregistered (frozen) task."""
    src = FakeSource()
    src.anon("a", [fill("x")])
    ksm, table, clock = booted(src)
    t = src.anon("t", [fill("x")])
    ksm.hint(t, True)
    src.kill(t)
    ksm.task_exit(t)
    assert not ksm.crawler.frozen_tasks  # type: ignore[attr-defined]


# -- 2. exec: a new mm, a newcomer at the next crawl ------------------------------------


def test_exec_exits_the_old_mm_and_the_new_one_joins_as_a_newcomer() -> None:
    """exec_mmap() drops the old mm (ksm_exit: scanning_process 1 -> 0 at once); the new
    mm has no MMF_VM_MERGEABLE, so the next prepare's ksm_join() allocates a slot
    (__ksm_enter_alloc_slot: KSM_MM_LISTED | KSM_MM_NEWCOMER) and counts it (ret > 0),
    which a partial scan then scans (newcomers are in partial scans).  The short-task
    test reads sum_exec_runtime, which survives the exec: 1000 ms, not short."""
    src = FakeSource()
    p = imaged(src, src.anon("p", [fill("x"), fill("x"), unique(1)]))
    ksm, table, clock = booted(src)
    assert show(table, "scanning_process") == 1
    new = exec_(src, p, [fill("z"), fill("z")])
    ksm.task_exit(p)  # what the daemon's lifecycle watcher reports
    assert show(table, "scanning_process") == 0
    request(table, 1)
    settle(ksm, clock)
    assert show(table, "scanning_process") == 1
    slot = ksm.slots[new]
    assert slot.task.image == new.image and slot.state & KSM_MM_SCANNED and not slot.state & KSM_MM_NEWCOMER
    assert ksm.counters()["rmap_items"] == 2  # the new image's pages; the old mm's freed
    assert not ksm.mm.remove_list
    ksm.task_exit(p)  # the old mm told again (late): the new one stays
    assert show(table, "scanning_process") == 1 and ksm.slots[new].task.image == new.image


def test_exec_noticed_only_at_the_prepare_takes_the_same_path() -> None:
    """No watcher: the prepare's for_each_process finds the old mm gone (its TaskId is
    not listed) and the new one unregistered."""
    src = FakeSource()
    p = imaged(src, src.anon("p", [fill("x"), fill("x")]))
    ksm, table, clock = booted(src)
    new = exec_(src, p, [fill("z")])
    request(table, 1)
    settle(ksm, clock)
    assert [s.task.image for s in ksm.slots.values()] == [new.image] and show(table, "scanning_process") == 1
    assert ksm.counters()["tasks_exited"] == 1


# -- 3. madvise(MADV_MERGEABLE): __ksm_enter at once, no short-task test ----------------


def madvising(src: FakeSource, runtime_ms: int = 10) -> TaskId:
    """A task that madvised its first mapping (VM_MERGEABLE: `mg`) and not its second."""
    P = PAGE_SIZE
    adv = Mapping(0x10000000, 0x10000000 + 2 * P, vm_mergeable=True)
    plain = Mapping(0x30000000, 0x30000000 + 2 * P)
    return src.add("adv", [(adv, {0: fill("m"), 1: fill("m")}), (plain, {0: fill("m"), 1: fill("m")})],
                   runtime_ms=runtime_ms)


def test_madvise_registers_a_short_task_at_once() -> None:
    """ksm_madvise() -> __ksm_enter(mm, KSM_TASK_UNFROZEN): a listed newcomer on the
    scan list's tail and `ksm_nr_added_process++`, whatever run is (here 0) and however
    short the task (10 ms): check_short_task() is only in the prepare loops."""
    src = FakeSource()
    t = madvising(src)
    ksm = Ksm(src, clock=VirtualClock())
    table = AttributeTable(ksm)
    assert ksm.madvise(t)
    assert show(table, "scanning_process") == 1
    slot = ksm.slots[t]
    assert slot.state == KSM_MM_LISTED | KSM_MM_NEWCOMER and slot in ksm.mm.scan_list
    assert not ksm.madvise(t)  # MMF_VM_MERGEABLE set: no second slot
    assert show(table, "scanning_process") == 1


def test_a_madvised_short_task_is_scanned_in_its_madvised_mappings_only() -> None:
    """The prepares' ksm_join() skips the short task (check_short_task at L1310/L1411),
    so only the VMA the task madvised is VM_MERGEABLE: its 2 pages are the slot's rmap
    items; they are equal, so after the initial rounds (the checksum gate) one KSM page
    mapped twice.  Once the task is no longer short, ksm_join() marks every VMA (ret 0:
    the slot exists) and the next scan has all 4 pages: one KSM page mapped 4 times."""
    src = FakeSource()
    t = madvising(src)
    ksm, table, clock = booted(src)  # the prepare meets the madvise first (Ksm.madvise)
    assert show(table, "scanning_process") == 1 and t not in ksm.skipped
    assert ksm.counters()["rmap_items"] == 2
    assert (show(table, "pages_shared"), show(table, "pages_sharing")) == (1, 1)
    src.procs[t].runtime_ns = 150 * 10**6
    request(table, 2)
    settle(ksm, clock)
    assert ksm.counters()["rmap_items"] == 4
    assert (show(table, "pages_shared"), show(table, "pages_sharing")) == (1, 3)
    assert show(table, "scanning_process") == 1


def test_a_short_task_that_did_not_madvise_is_still_skipped() -> None:
    src = FakeSource()
    src.anon("base", [unique(1)])
    t = src.anon("s", [fill("m")] * 2, runtime_ms=10)
    ksm, table, clock = booted(src)
    assert show(table, "scanning_process") == 1 and ksm.skipped[t].reason == "short_task"  # base only


# -- 4. run 8 -> 0, then a one_shot_scanning write ----------------------------------------


def test_run_8_to_0_then_a_request_is_prepared_and_waits_for_the_merge_bit() -> None:
    """run_store() wakes ksm_crawl_wait only with the merge bit: the crawler stays in
    lksm_do_wait_userspace_event(); one_shot_scanning_store() wakes it whatever run is,
    and lksm_do_crawl_once() prepares the partial scan (the newcomer n joins:
    scanning_process 1 -> 2) and wakes the scanner, which ksmd_should_run() keeps idle
    without KSM_RUN_MERGE: the request reads back 1.  lksmfs then serves it when run
    gets the merge bit (the seed's scanner is never woken again)."""
    src = FakeSource()
    src.anon("a", [fill("x")])
    ksm, table, clock = booted(src)
    table.store("run", b"0\n")
    settle(ksm, clock)
    n = src.anon("n", [fill("x")])
    request(table, 1)
    settle(ksm, clock)
    assert show(table, "scanning_process") == 2 and n in ksm.slots  # prepared
    assert show(table, "one_shot_scanning") == 1 and ksm.scan_state  # held, pending
    assert not ksm.scanner_should_run() and not ksm.slots[n].state & KSM_MM_SCANNED
    with pytest.raises(OSError):
        request(table, 2)  # still pending: EINVAL, as in the seed
    table.store("run", b"8\n")
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and not ksm.scan_state
    assert ksm.slots[n].state & KSM_MM_SCANNED
    request(table, 2)  # and the next one runs
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and show(table, "full_scans") == 4


def test_run_8_to_0_then_run_1_serves_the_held_request_too() -> None:
    src = FakeSource()
    src.anon("a", [fill("x")])
    ksm, table, clock = booted(src)
    table.store("run", b"0\n")
    request(table, 2)
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 2 and show(table, "full_scans") == 3
    table.store("run", b"1\n")
    while ksm.scan_state:
        if ksm.scanner_should_run():
            ksm.scan_batch()
        else:
            ksm.crawl(clock.now)
    assert show(table, "one_shot_scanning") == 0 and show(table, "full_scans") == 4


def test_run_8_to_0_with_no_one_to_scan_ends_the_request_at_once() -> None:
    """lksm_do_crawl_once(): nr_added 0 -> "No one can be scanned!", request cleared
    (a partial scan: no newcomer, nothing frozen, no VIP - base never merged)."""
    src = FakeSource()
    src.anon("base", [unique(1)])
    ksm, table, clock = booted(src)
    table.store("run", b"0\n")
    request(table, 1)
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and not ksm.scan_state


def test_run_1_to_0_then_a_request_prepares_nothing() -> None:
    """From run=1 the crawler is in lksm_do_wait_frozen_event() and then waits for the
    merge bit: a request wakes nothing that prepares.  It is served by the next run=8."""
    src = FakeSource()
    src.anon("a", [fill("x")])
    clock = VirtualClock()
    ksm = Ksm(src, clock=clock)
    table = AttributeTable(ksm)
    table.store("run", b"1\n")
    for _ in range(200):  # the initial rounds
        if ksm.scanner_should_run():
            ksm.scan_batch()
        elif show(table, "full_scans") >= 3:
            break
        else:
            due = ksm.crawl(clock.now)
            clock.now = max(clock.now, due if due is not None else clock.now)
    while ksm.scan_state:
        ksm.scan_batch()
    table.store("run", b"0\n")
    n = src.anon("n", [fill("x")])
    request(table, 1)
    settle(ksm, clock)
    assert n not in ksm.slots and show(table, "one_shot_scanning") == 1 and not ksm.scan_state
    table.store("run", b"8\n")
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and n in ksm.slots


# -- 5. the frozen task list: list_add at the head, taken from the head ------------------


def test_unregistered_frozen_tasks_are_joined_last_frozen_first() -> None:
    """lksm_task_frozen() list_add()s an unregistered task at the head of
    frozen_task_list and lksm_prepare_frozen_scan() takes list_first_entry: a, b, c
    frozen in that order join (and are queued by __ksm_enter_alloc_slot's
    list_add_tail) as c, b, a."""
    src = FakeSource()
    src.anon("base", [unique(1)])  # merges nothing: no VIP
    ksm, table, clock = booted(src)
    a, b, c = (src.anon(n, [fill("x")]) for n in "abc")
    for t in (a, b, c):
        ksm.hint(t, True)
    assert ksm.prepare_partial_scan() == 3
    assert [s.task for s in ksm.mm.scan_list] == [c, b, a]


def test_registered_tasks_that_freeze_are_queued_first_frozen_first() -> None:
    """lksm_task_frozen() for a registered, listed slot: list_add_tail onto the scan
    list (L1923): first in, first out."""
    src = FakeSource()
    a, b, c = (src.anon(n, [fill("x")]) for n in "abc")
    ksm, table, clock = booted(src)
    for t in (c, a, b):
        ksm.hint(t, True)
    assert [s.task for s in ksm.mm.scan_list] == [c, a, b]


def test_a_task_frozen_again_before_the_prepare_counts_as_frozen_last() -> None:
    src = FakeSource()
    src.anon("base", [unique(1)])
    ksm, table, clock = booted(src)
    a, b = (src.anon(n, [fill("x")]) for n in "ab")
    ksm.hint(a, True)
    ksm.hint(b, True)
    ksm.hint(a, True)
    ksm.prepare_partial_scan()
    assert [s.task for s in ksm.mm.scan_list] == [a, b]


# -- 6. the full scan's delay: (nr_frozen + nr_added) * lksm_proc_scan_time, in jiffies ----


class TimedSource(FakeSource):
    """Each slot's scan takes 0.25 s of virtual time (one present_anon per VMA)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        self.clock.now += 0.25
        return super().present_anon(task, start_vpn, end_vpn)


@pytest.mark.parametrize(("hz", "term_s"), [(100, 0.05), (250, 0.124), (1000, 0.5)])
def test_full_scan_delay_adds_new_slots_times_the_scan_time_per_slot(hz: int, term_s: float) -> None:
    """lksm_scan_thread(): lksm_proc_scan_time = elapsed / lksm_nr_scanned_slot, in
    jiffies.  lksm_prepare_full_scan(): delay += msecs_to_jiffies((nr_frozen + nr_added)
    * lksm_proc_scan_time) - jiffies taken for milliseconds, so HZ matters - and
    next_fullscan = jiffies + delay + msecs_to_jiffies(full_scan_interval).

    A full scan of 2 slots takes 0.5 s: HZ=100: 50 jiffies, 25 per slot; 2 newcomers:
    msecs_to_jiffies(50) = 5 jiffies = 0.05 s.  HZ=250: 125 / 2 = 62; msecs_to_jiffies
    (124) = ceil(31.0) = 31 jiffies = 0.124 s.  HZ=1000: 250 per slot, 500 ms = 0.5 s.
    Plus the slots' own `elapsed` (0.25 s each for the 2 old slots requeued)."""
    clock = VirtualClock()
    src = TimedSource(clock)
    src.anon("a", [fill("x")])
    src.anon("b", [fill("y")])
    ksm = Ksm(src, clock=clock)
    ksm.crawler.hz = hz  # type: ignore[attr-defined]
    ksm.full_scan()
    assert ksm.crawler.proc_scan_time == int(0.5 * hz) // 2  # type: ignore[attr-defined]
    src.anon("n1", [fill("z")])
    src.anon("n2", [fill("w")])
    now = clock.now
    assert ksm.prepare_full_scan(now) == 4
    interval = ksm.tunables.full_scan_interval / 1000
    assert ksm.crawler._next_fscan == pytest.approx(now + 0.5 + interval + term_s)  # type: ignore[attr-defined]
    assert ksm.scanner.scan_mode == LKSM_SCAN_FULL


# -- the mm's identity from /proc/PID/stat ------------------------------------------------


def _stat_line(pid: int, start: int, layout: tuple[int, int, int] | None, state: str = "S") -> bytes:
    """A stat line with fields 1-28 (or 1-25 when `layout` is None)."""
    fields = [state, "1", "1", "1", "0", "-1", "4194560", "7", "0", "3", "0", "5", "6", "0", "0", "20", "0",
              "1", "0", str(start), "4096", "10", "18446744073709551615"]
    if layout is not None:
        fields += [str(x) for x in layout]
    return f"{pid} (a b) c) {' '.join(fields)}\n".encode()


def test_an_exec_changes_the_image_and_a_process_without_mm_has_none() -> None:
    """execve() sets mm->start_code, end_code and start_stack (do_task_stat prints them,
    0 0 0 for a task without an mm, 1 1 0 without ptrace access)."""
    from lksmfs.system.proc import parse_stat

    before = parse_stat(_stat_line(42, 900, (0x5000, 0x6000, 0x7FFF0000)))
    again = parse_stat(_stat_line(42, 900, (0x5000, 0x6000, 0x7FFF0000)))
    execd = parse_stat(_stat_line(42, 900, (0x5000, 0x6000, 0x7FFE0000)))  # randomised stack
    zombie = parse_stat(_stat_line(42, 900, (0, 0, 0), state="Z"))
    exiting = parse_stat(_stat_line(42, 900, (0, 0, 0), state="R"))  # past exit_mm(), not a zombie yet
    denied = parse_stat(_stat_line(42, 900, (1, 1, 0)))
    short = parse_stat(_stat_line(42, 900, None))
    t = before.task_id
    assert t == again.task_id and t.image != 0 and t.same_mm(again) and t.same_image(again.task_id)
    assert execd.task_id == t and not t.same_image(execd.task_id) and not t.same_mm(execd)  # same task, new mm
    assert (execd.task_id.pid, execd.task_id.start_time) == (t.pid, t.start_time)
    assert not zombie.alive and not exiting.alive and not t.same_mm(exiting) and not t.same_mm(zombie)
    assert denied.alive and denied.image != 0
    assert short.alive and short.image == 0 and TaskId(42, 900).same_mm(short)
    assert TaskId(42, 900).same_mm(before) and TaskId(42, 900).same_image(t)  # no image: not compared
    assert not t.same_mm(parse_stat(_stat_line(42, 901, (0x5000, 0x6000, 0x7FFF0000))))  # pid reused
    assert str(t) == "42@900"


def test_run_8_to_0_during_a_scan_leaves_the_crawler_waiting_for_the_scan_not_a_request() -> None:
    """The crawler that handed a scan over waits for its end (lksm_crawl_thread:
    wait_event_freezable(!lksm_check_scan_state)), not for a request: with run 0 the
    interrupted scan's request stays pending, nothing is prepared (the newcomer n does
    not join) until run=8, which serves it."""
    src = FakeSource()
    src.anon("a", [unique(i) for i in range(8)])
    ksm, table, clock = booted(src)
    request(table, 2)
    ksm.crawl(clock.now)
    ksm.scan_batch(2)  # mid-scan
    table.store("run", b"0\n")
    n = src.anon("n", [fill("x")])
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 2 and n not in ksm.slots and not ksm.scan_state
    table.store("run", b"8\n")
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and n in ksm.slots


def test_run_2_drops_a_held_request_and_the_next_one_completes() -> None:
    """run=2 cancels the scan in progress and drops a pending request (README: lksmfs
    keeps every slot queued); a held scan is such a scan."""
    src = FakeSource()
    src.anon("a", [fill("x"), fill("x")])
    ksm, table, clock = booted(src)
    table.store("run", b"0\n")
    request(table, 2)
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 2 and ksm.scan_state
    table.store("run", b"2\n")
    assert show(table, "one_shot_scanning") == 0 and not ksm.scan_state
    table.store("run", b"8\n")
    settle(ksm, clock)
    request(table, 2)
    settle(ksm, clock)
    assert show(table, "one_shot_scanning") == 0 and not ksm.scan_state
    assert (show(table, "pages_shared"), show(table, "pages_sharing")) == (1, 1)
