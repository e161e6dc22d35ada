"""ksm_crawld: LKSM's scheduling policy - what to scan, and when.

mm/lksm.c splits the kernel's ksmd in two threads.  The crawler decides: three initial
full scans a second apart once `run` gets the merge bit, then either periodic full
scans with partial scans on frozen-task events (run=1) or nothing until user space
writes one_shot_scanning (run=8).  It prepares the scan list - frozen tasks from the
freezer hook, newcomers, VIPs ranked by recent merges - and hands it to the scanner.

This object is the engine's *policy* (context.ScanPolicy): the scanner and the merger
ask it the few questions whose answer differs between LKSM and mainline ksmd (which
rounds have the checksum gate, which slots may be filtered, what a scan's start and end
change).
"""

from __future__ import annotations

import numpy as np

from lksmfs.engine.context import CrawlerCtx
from lksmfs.engine.merge import SourceError
from lksmfs.engine.params import (
    CRAWLER_SLEEP_S,
    DEFAULT_FULL_SCAN_INTERVAL,
    INITIAL_ROUND,
    KSM_MM_FROZEN,
    KSM_MM_LISTED,
    KSM_MM_NEWCOMER,
    KSM_MM_SCANNED,
    KSM_RUN_MERGE,
    KSM_RUN_ONESHOT,
    KSM_RUN_UNMERGE,
    LKSM_CRAWL_FROZEN_EVENT_WAIT_S,
    LKSM_DEFAULT_PAGES_TO_SCAN,
    LKSM_HZ,
    LKSM_MAX_VIPS,
    LKSM_SCAN_FULL,
    LKSM_SCAN_NONE,
    LKSM_SCAN_PARTIAL,
)
from lksmfs.engine.regions import RegionTable
from lksmfs.engine.rmap import Rmap
from lksmfs.engine.slot import MarkedVmas, MmSlot
from lksmfs.engine.stats import Skipped
from lksmfs.sources.base import AccessDenied, Mapping, ProcessGone, TaskId


def msecs_to_jiffies(ms: int, hz: int) -> int:
    """msecs_to_jiffies(): rounded up."""
    return -(-ms * hz // 1000)


# crawler phases (lksm_crawl_thread's three loops)
_WAIT_RUN, _INITIAL, _NORMAL = range(3)

TaskInfo = tuple[bool, int, int, str, int]  # (is_short, faults, anon_pages, comm, runtime_ns)

# why a task the crawler found was not scanned (Ksm.skipped, what `lksmfs scan` reports)
SKIP_SHORT = "short_task"  # check_short_task(): less CPU time than Ksm.short_task_ms
SKIP_DENIED = "permission_denied"  # /proc refused its stat or its maps (AccessDenied)


class LksmCrawler:
    """lksm_crawl_thread, the prepare functions, the frozen task list and the hints."""

    def __init__(self, ksm: CrawlerCtx) -> None:
        self.k = ksm
        self.crawl_round = 0  # ksm_crawl_round
        self.frozen_tasks: dict[TaskId, None] = {}  # frozen_task_list
        self._phase = _WAIT_RUN
        self._next_fscan = 0.0
        self._partial_at: float | None = None
        # the normal loop last ran under run=8 and nothing since took the crawler out of
        # lksm_do_wait_userspace_event(), which looks at one_shot_scanning only
        self._parked = False
        # the scan handed to the scanner was prepared for a request while run had no
        # merge bit: the scanner (ksmd_should_run) waits for the bit to run it
        self._held = False
        # CONFIG_HZ, the unit of the seed's scan times; the scan in progress began at
        # jiffy _scan_begin; lksm_last_scan_time and lksm_proc_scan_time, in jiffies
        self.hz = LKSM_HZ
        self._scan_begin = 0
        self.last_scan_time = 0
        self.proc_scan_time = 0

    # -- the thread -----------------------------------------------------------------

    def crawl(self, now: float) -> float | None:
        """One pass of lksm_crawl_thread at monotonic time `now`.

        Returns when it wants to run next, or None to sleep until woken (a store to run
        or one_shot_scanning, a hint, or the end of a scan).
        """
        t = self.k.tunables
        scanning = self.k.scanner.scan_state
        if self._phase == _WAIT_RUN:
            if not t.run & KSM_RUN_MERGE:
                return None
            self._phase = _INITIAL
            self._next_fscan = now
        if self._phase == _INITIAL:
            # initial loop: initial_round full scans, crawler_sleep apart.  Merging turned
            # off meanwhile: sleep until a store wakes us (the seed's loop would spin)
            if not t.run & KSM_RUN_MERGE:
                return None
            if not scanning and now >= self._next_fscan:
                if self.prepare_full_scan(now) > 0:
                    self.k.scanner.wake()
                self._next_fscan = now + CRAWLER_SLEEP_S
            scanning = self.k.scanner.scan_state
            if self.crawl_round < INITIAL_ROUND:
                return now + CRAWLER_SLEEP_S if scanning else max(self._next_fscan, now)
            t.full_scan_interval = DEFAULT_FULL_SCAN_INTERVAL
            self._next_fscan = now + t.full_scan_interval / 1000
            self._phase = _NORMAL
            return None if scanning else now
        # normal operation loop
        if t.run & KSM_RUN_ONESHOT:
            self._parked = not scanning  # in lksm_do_crawl_once(), or waiting for the scan
            if scanning:
                return None  # wait until scanning is done
            return self._crawl_once(now)
        if t.run & KSM_RUN_MERGE:
            self._parked = False
            if scanning:
                return now + CRAWLER_SLEEP_S
            return self._crawl_periodic(now)
        if self._parked and not scanning:
            # run 8 -> 0: run_store() does not wake the crawler (no merge bit), which
            # still waits in lksm_do_wait_userspace_event(); a one_shot_scanning write
            # wakes it and it prepares the request as under run=8.  The scanner does
            # not run it (ksmd_should_run() needs the merge bit): the request reads
            # back pending until run gets the bit again, which the seed never notices
            # (nothing wakes its scanner) and lksmfs does (scanner_may_run)
            return self._crawl_once(now, held=True)
        self._partial_at = None
        return None

    def _crawl_once(self, now: float, held: bool = False) -> float | None:
        """lksm_do_crawl_once(): wait for a one_shot_scanning request, then prepare it.
        `held`: run has no merge bit (see crawl()); once prepared, the crawler leaves
        the wait for the `ksm is not activated` one."""
        t = self.k.tunables
        if self._partial_at is None:
            if t.one_shot_scanning == LKSM_SCAN_PARTIAL:
                # msleep(LKSM_CRAWL_FROZEN_EVENT_WAIT) to batch frozen events
                self._partial_at = now + LKSM_CRAWL_FROZEN_EVENT_WAIT_S
                return self._partial_at
            if t.one_shot_scanning != LKSM_SCAN_FULL:
                return None
            nr_added = self.prepare_full_scan(now)
        else:
            if now < self._partial_at:
                return self._partial_at
            self._partial_at = None
            nr_added = self.prepare_partial_scan()
        if nr_added > 0:
            self.k.scanner.wake()
            self._held = held
            self._parked = False  # the crawler now waits for the scan to end
        else:  # "No one can be scanned!"
            t.one_shot_scanning = LKSM_SCAN_NONE
            self._nothing_to_scan()
        if held:
            self._parked = False  # and then for the merge bit
        self.k.publish()
        return None

    def _crawl_periodic(self, now: float) -> float | None:
        """lksm_do_crawl_periodic(): full scan when due, else a partial scan on frozen
        events (waiting up to crawler_sleep for them, then 100 ms more to batch them)."""
        nr_added = 0
        if self._partial_at is not None:
            if now < self._partial_at:
                return self._partial_at
            self._partial_at = None
            nr_added = self.prepare_partial_scan()
        elif now >= self._next_fscan:
            nr_added = self.prepare_full_scan(now)
        elif self.frozen_tasks or self.k.scanner.queued():
            self._partial_at = now + LKSM_CRAWL_FROZEN_EVENT_WAIT_S
            return self._partial_at
        else:
            return min(self._next_fscan, now + CRAWLER_SLEEP_S)
        self.k.publish()
        if nr_added > 0:
            self.k.scanner.wake()
            return now + CRAWLER_SLEEP_S
        # nothing to scan: wait for events rather than prepare again at once (a
        # full_scan_interval of 0 with no process would make the seed's loop spin)
        self._nothing_to_scan()
        return now + CRAWLER_SLEEP_S

    def _nothing_to_scan(self) -> None:
        """A prepared scan that queued nobody: the scanner is not woken.  Exited slots
        stay on the remove list: only a scanner's wrap-up frees them
        (lksm_scan_wrapup_wait)."""
        self.k.scanner.scan_mode = LKSM_SCAN_NONE

    # -- task discovery and ksm_join ----------------------------------------------------

    def _live_tasks(self) -> list[TaskId]:
        """for_each_process() less ourselves: every task the source may scan.  Registered
        slots whose task is gone (or left the scope), or has another mm since (an exec:
        its image changed), take the __ksm_exit() path here."""
        k = self.k
        tasks = [t for t in k.source.tasks() if t.pid != k.self_pid and t.pid != 0]
        alive = {t: t for t in tasks}
        for task, slot in list(k.mm.slots.items()):
            now = alive.get(task)
            if now is None or not slot.task.same_image(now):
                k.ksm_exit(slot)
        return tasks

    def _short_task(self, task: TaskId) -> TaskInfo | None:
        """check_short_task() with the engine's threshold (Ksm.short_task_ms, LKSM's 100 ms
        unless a user overrides it): None when the task is gone or unreadable, else
        (is_short, faults, anon_pages, comm, runtime_ns)."""
        try:
            st = self.k.source.stat(task)
        except ProcessGone as e:
            self.k.stats.failed(e)
            return None
        except AccessDenied:
            self.k.stats.tasks_denied += 1
            self.k.skipped[task] = Skipped("", SKIP_DENIED)
            return None
        if st.kthread:
            return None
        short = st.runtime_ns < self.k.short_task_ms * 1_000_000
        return short, st.faults, st.anon_pages, st.comm, st.runtime_ns

    def _ksm_join(self, task: TaskId, frozen: bool, info: TaskInfo | None = None) -> tuple[MmSlot | None, bool]:
        """ksm_join(): register the task (if new) and mark its VMAs mergeable.
        Returns (slot, newly_allocated); slot None when the task cannot be joined."""
        k = self.k
        slot = k.mm.get(task)
        new = slot is None
        if slot is None:
            info = info if info is not None else self._short_task(task)
            if info is None:
                return None, False
            _, faults, anon, comm, _ = info
            # __ksm_enter_alloc_slot(): queued unless run=2 is in progress
            slot = k.mm.alloc(task, comm, faults, anon, frozen, queue=not k.tunables.run & KSM_RUN_UNMERGE)
            k.stats.nr_added_process += 1
        slot.madvised = False  # every VMA is VM_MERGEABLE from now on
        self._mark_mergeable(slot)
        return slot, new

    def _mark_mergeable(self, slot: MmSlot) -> None:
        """The VMA loop of ksm_join(): a VMA is marked VM_MERGEABLE once, and only then,
        with LKSM_FILTER, registers its file region - if it has an anon_vma at that
        moment.  A VMA that gets its first anonymous page after it was marked is never
        registered (lksm_find_region() may still find a region another VMA registered).

        User space cannot set VM_MERGEABLE: the slot remembers the VMAs it marked, and a
        VMA overlapping one of them with the same file is the same, already marked, VMA
        (grown, shrunk or split - all of which keep the flag)."""
        k = self.k
        try:
            maps = k.source.mappings(slot.task)
        except SourceError as e:
            if isinstance(e, AccessDenied):
                k.skipped[slot.task] = Skipped(slot.comm, SKIP_DENIED)
            return  # the scanner will take the exit path
        now: list[Mapping] = []
        for i, vma in enumerate(maps):
            if not vma.mergeable:
                continue
            now.append(vma)
            if slot.marked.covers(vma.start, vma.end, vma.file):
                continue  # already VM_MERGEABLE: ksm_join() skips it
            if not k.filter_enabled or not RegionTable.is_file_anon_candidate(vma):
                continue
            rid = k.regions.register(maps, i, self.crawl_round)
            if rid is not None and rid not in slot.regions:
                slot.regions.add(rid)
                k.regions.ref(rid)
        slot.marked = MarkedVmas(now)

    def _join_newcomers(self, tasks: list[TaskId]) -> int:
        """The for_each_process() loop of both prepare functions: every task that is not
        short joins (new ones get a slot, known ones get their new VMAs marked).  A
        short task that madvised (or prctl'd) KSM was registered by ksm_madvise() with
        no short-task test: here it is if nobody told the engine yet (Ksm.madvise);
        ksm_join() still skips it until it is no longer short."""
        nr_added = 0
        for task in tasks:
            info = None
            slot = self.k.mm.get(task)
            if slot is not None and slot.exited:
                continue  # its old mm, still under the scanner's cursor: it joins next time
            if slot is None or slot.madvised:
                info = self._short_task(task)
                if info is None:
                    continue
                if info[0]:
                    if slot is None and not (self._madvised(task) and self.madvise(task)):
                        self.k.skipped[task] = Skipped(info[3], SKIP_SHORT, info[4])
                    continue
            _, new = self._ksm_join(task, frozen=False, info=info)
            nr_added += new
        return nr_added

    def _madvised(self, task: TaskId) -> bool:
        """Has the task madvise(MADV_MERGEABLE)d or prctl(PR_SET_MEMORY_MERGE)d (MMF_VM_
        MERGEABLE on the host)?  A source that knows cheaply says (procfs: ksm_stat);
        else any VMA with VM_MERGEABLE (`mg`)."""
        src = self.k.source
        registered = getattr(src, "ksm_registered", None)
        try:
            if callable(registered):
                return bool(registered(task))
            return any(m.vm_mergeable for m in src.mappings(task))
        except SourceError:
            return False

    def madvise(self, task: TaskId) -> bool:
        """__ksm_enter(mm, KSM_TASK_UNFROZEN) from ksm_madvise(): a listed newcomer,
        queued at the scan list's tail (on ksm_mm_head only while run=2 is in
        progress), `ksm_nr_added_process++`; no short-task test.  False when the task
        cannot be read."""
        k = self.k
        try:
            st = k.source.stat(task)
        except SourceError:
            return False
        if st.kthread:
            return False
        slot = k.mm.alloc(task, st.comm, st.faults, st.anon_pages, frozen=False,
                          queue=not k.tunables.run & KSM_RUN_UNMERGE)
        slot.madvised = True
        k.stats.nr_added_process += 1
        return True

    # -- preparation --------------------------------------------------------------------

    def _prepare_frozen_scan(self, alive: set[TaskId]) -> int:
        """lksm_prepare_frozen_scan(): join the frozen tasks nobody knew yet; returns how
        many were joined.  Only tasks the source may scan (`alive`) can join: a hint for
        anything else is dropped here rather than counted as work.

        Deviation: the seed counts `!err` of ksm_join (the *already registered* tasks)
        as added; we count the newly joined frozen tasks, so that a request after freezing
        an unknown task scans it instead of finding "no one can be scanned".
        """
        if not self.frozen_tasks:
            return 0
        # frozen_task_list: lksm_task_frozen() list_add()s at the head, and the head is
        # taken first (list_first_entry_or_null): the task frozen last joins first
        tasks = list(reversed(self.frozen_tasks))
        self.frozen_tasks.clear()
        if self.k.tunables.run & KSM_RUN_UNMERGE:
            return 0
        nr_added = 0
        for task in tasks:
            if task not in alive:
                continue
            slot, new = self._ksm_join(task, frozen=True)
            nr_added += slot is not None and new
        return nr_added

    def _prepare(self, mode: int) -> int | None:
        """The common head of both prepare functions: the live tasks, the frozen list,
        then every other task joins; returns the newcomers.  None when run=2 aborts."""
        if self.k.tunables.run & KSM_RUN_UNMERGE:
            return None
        self.k.skipped.clear()  # what this scan leaves out replaces the last one's
        tasks = self._live_tasks()
        self._prepare_frozen_scan(set(tasks))
        nr_added = self._join_newcomers(tasks)
        self.k.scanner.scan_mode = mode
        return nr_added

    def _prepared(self) -> int:
        """The end of both prepare functions.  What the scanner will visit is what is
        queued, so that is the count: a prepared scan with nobody queued ends at once
        ("No one can be scanned!"), whatever hints or exits happened meanwhile."""
        self.crawl_round += 1
        self.k.publish()
        return self.k.scanner.queued()

    def prepare_full_scan(self, now: float | None = None) -> int:
        """lksm_prepare_full_scan(): frozen list + every process, all slots queued.
        Returns the number of slots queued."""
        k = self.k
        now = k.clock() if now is None else now
        nr_added = self._prepare(LKSM_SCAN_FULL)
        if nr_added is None:
            return 0
        nr_frozen = k.mm.nr_frozen()
        # lksm_count_and_clear_mm_slots()
        delay = 0.0
        for slot in k.mm.slots.values():
            if slot not in k.mm.scan_list and slot is not k.scanner.cur:
                slot.clear(KSM_MM_SCANNED)
                slot.nr_scans = 0
                k.mm.scan_list.add_tail(slot)
                delay += slot.elapsed
        # "calculate crawler's sleep time": lksm_proc_scan_time is in jiffies, yet handed
        # to msecs_to_jiffies() as milliseconds - so the term depends on HZ
        delay += msecs_to_jiffies((nr_frozen + nr_added) * self.proc_scan_time, self.hz) / self.hz
        self._next_fscan = now + delay + k.tunables.full_scan_interval / 1000
        return self._prepared()

    def prepare_partial_scan(self) -> int:
        """lksm_prepare_partial_scan(): frozen tasks + newcomers + up to lksm_max_vips
        VIPs by merge window, skipping VIPs whose fault count has not moved.  Returns
        the number of slots queued."""
        k = self.k
        nr_added = self._prepare(LKSM_SCAN_PARTIAL)
        if nr_added is None:
            return 0
        nr_frozen = k.mm.nr_frozen()
        nr_scannable = 0
        if nr_added + nr_frozen < LKSM_MAX_VIPS:
            recheck: list[MmSlot] = []
            for slot in k.mm.vips_by_merges():
                if nr_scannable + nr_added + nr_frozen >= LKSM_MAX_VIPS:
                    break
                if slot.removed or not slot.test(KSM_MM_LISTED):
                    continue
                try:  # pruning by fault count
                    st = k.source.stat(slot.task)
                except SourceError as e:
                    k.stats.failed(e)
                    k.ksm_exit(slot)
                    continue
                if st.faults == slot.fault_cnt:
                    continue
                slot.fault_cnt = st.faults
                slot.scanning_size = st.anon_pages
                slot.nr_scans = 0
                slot.clear(KSM_MM_SCANNED)
                recheck.append(slot)
                nr_scannable += 1
            if k.filter_enabled:
                for slot in recheck:  # check new maps
                    self._mark_mergeable(slot)
            for slot in reversed(recheck):  # list_splice() onto the head
                k.mm.scan_list.remove(slot)
                k.mm.scan_list.add_head(slot)
        return self._prepared()

    # -- the freezer hook -----------------------------------------------------------------

    def hint(self, task: TaskId, frozen: bool) -> None:
        """lksm_hint(): the freezer told us a task froze or thawed."""
        if frozen:
            self._task_frozen(task)
        else:
            self._task_thawed(task)

    def _task_frozen(self, task: TaskId) -> None:
        """lksm_task_frozen(): a listed slot becomes FROZEN and is queued; an unknown
        task goes onto the frozen task list."""
        k = self.k
        slot = k.mm.get(task)
        if slot is not None:
            if slot is not k.scanner.cur and slot.test(KSM_MM_LISTED):
                k.mm.scan_list.add_tail(slot)
                slot.clear(KSM_MM_LISTED)
                slot.set(KSM_MM_FROZEN)
        elif not any(s.task.same_image(task) for s in k.mm.remove_list):
            self.frozen_tasks.pop(task, None)  # at the head again (the newest)
            self.frozen_tasks[task] = None

    def _task_thawed(self, task: TaskId) -> None:
        """lksm_task_thawed(): the reverse; a slot already scanned leaves the queue."""
        k = self.k
        slot = k.mm.get(task)
        if slot is not None:
            if slot.test(KSM_MM_FROZEN) and slot is not k.scanner.cur:
                if slot.test(KSM_MM_SCANNED):
                    k.mm.scan_list.remove(slot)
                slot.clear(KSM_MM_FROZEN)
                slot.set(KSM_MM_LISTED)
        else:
            self.frozen_tasks.pop(task, None)

    def forget(self, task: TaskId) -> None:
        """lksm_remove_candidate(): an exited task leaves the frozen task list."""
        self.frozen_tasks.pop(task, None)

    def unmerged(self) -> None:
        self._partial_at = None
        self._held = False

    # -- the policy's answers to the scanner ----------------------------------------------

    def checksum_gate(self, scan_round: int) -> bool:
        """cmp_and_merge_page(): LKSM checks checksums during the initial rounds only
        (and never for frozen tasks' pages, which the merger checks per item)."""
        return scan_round < INITIAL_ROUND

    def filtering_allowed(self, slot: MmSlot) -> bool:
        """__scan_next_rmap_item(): newcomers and frozen slots are never filtered."""
        return not slot.test(KSM_MM_NEWCOMER | KSM_MM_FROZEN)

    def scan_starting(self, mode: int) -> None:
        """lksm_scan_thread(): a partial scan runs at scan_boost pages a batch; `begin`
        is taken when the scanner wakes for the scan."""
        self._scan_begin = self._jiffies()
        t = self.k.tunables
        if mode == LKSM_SCAN_PARTIAL:
            t.pages_to_scan = t.scan_boost

    def scan_wrapped(self, mode: int) -> None:
        """lksm_scan_wrapup_wait(): pages_to_scan back to its default after a partial
        scan, and a one-shot request served (also the one a held scan was prepared for,
        whatever run is now).  Before it, lksm_scan_thread() times the scan:
        lksm_last_scan_time and lksm_proc_scan_time (per slot scanned), in jiffies."""
        t = self.k.tunables
        elapsed = self._jiffies() - self._scan_begin
        self.last_scan_time = elapsed
        nr_scanned = self.k.stats.lksm_nr_scanned_slot
        if nr_scanned:  # the seed divides by it unchecked
            self.proc_scan_time = elapsed // nr_scanned
        if mode == LKSM_SCAN_PARTIAL:
            t.pages_to_scan = LKSM_DEFAULT_PAGES_TO_SCAN
        if t.run & KSM_RUN_ONESHOT or self._held:
            t.one_shot_scanning = LKSM_SCAN_NONE
        self._held = False

    def _jiffies(self) -> int:
        """get_jiffies_64() on the engine's clock, at self.hz."""
        return int(self.k.clock() * self.hz)

    def visit(self, part: Rmap, hi: np.ndarray, ksm_page: np.ndarray) -> tuple[np.ndarray, int]:
        """LKSM skips nothing here: every page but an unchanged KSM page goes to
        cmp_and_merge_page(), which applies LKSM's own checksum rule."""
        return np.flatnonzero(~ksm_page), 0

    def scanner_may_run(self) -> bool:
        """A handed-over scan runs to its wrap-up, even once run has lost its merge bit
        (the scanner then wraps it up at once); but one prepared while run had no merge
        bit waits for it (ksmd_should_run()), so that the request it serves stays
        pending until then."""
        return not self._held or bool(self.k.tunables.run & KSM_RUN_MERGE)
