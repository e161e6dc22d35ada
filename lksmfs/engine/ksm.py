"""The LKSM engine: crawler (ksm_crawld) and scanner (ksmd) as steps, in shadow mode.

A faithful port of mm/lksm.c (seed 002_a3a1b2fcd7996b55, with LKSM_FILTER from seed
000_9da3ef7a1f87f7e5) on a 5.4 mm/ksm.c base, with memory read from a `MemorySource`
instead of page tables.  Nothing here sleeps or starts a thread: the daemon calls
`crawl(now)` and `scan_batch()` from its threads, tests call them (or the synchronous
`full_scan()` / `partial_scan()`) directly, and both serialise calls with one lock.

Shadow mode: a "merge" records what the kernel would have done.  A KSM page is the
128-bit digest of the content two pages had when they were compared byte for byte and
merged; a mapped page whose content no longer has that digest was written to, which on
a kernel would have broken COW: its rmap item leaves the stable node (a broken merge).

Per page the hot path is vectorised (numpy over a chunk of up to CHUNK pages); only the
pages whose state really changes through a merge or a broken merge go through the
per-page `_cmp_and_merge_page()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator

import numpy as np
import xxhash

from lksmfs.engine.hashindex import HashIndex, normkey
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
    KSM_SHORT_TASK_TIME_MS,
    LKSM_CRAWL_FROZEN_EVENT_WAIT_S,
    LKSM_MAX_VIPS,
    LKSM_SCAN_FULL,
    LKSM_SCAN_NONE,
    LKSM_SCAN_PARTIAL,
    RMAP_ITEM_SIZE,
    Tunables,
)
from lksmfs.engine.regions import HEAP_REGION, UNKNOWN_REGION, RegionTable
from lksmfs.engine.rmap import FROZEN, STABLE, UNSTABLE, Rmap
from lksmfs.engine.slot import MarkedVmas, MmSlot, ScanList
from lksmfs.engine.stable import StableTree
from lksmfs.sources.base import PAGE_SIZE, AccessDenied, Mapping, MemorySource, ProcessGone, TaskId

log = logging.getLogger(__name__)

CHUNK = 1024  # pages handled per vectorised step
SEQNR_MASK = 0xFF
_VPN_BITS = 36
_VPN_MASK = (1 << _VPN_BITS) - 1
_NOT_UNSTABLE = np.uint8(~int(UNSTABLE) & 0xFF)
_NOT_FROZEN = np.uint8(~int(FROZEN) & 0xFF)
_CKSUM_MASK = np.uint64(0xFFFFFFFE)  # calc_checksum() keeps bit 0 for the frozen flag

_ZERO_DIGEST = xxhash.xxh3_128_digest(bytes(PAGE_SIZE))
_ZERO_HI = int.from_bytes(_ZERO_DIGEST[:8], "big")
_ZERO_LO = int.from_bytes(_ZERO_DIGEST[8:], "big")

# crawler phases (lksm_crawl_thread's three loops)
_WAIT_RUN, _INITIAL, _NORMAL = range(3)

_SourceError = (ProcessGone, AccessDenied)


def digest_pages(data: memoryview | bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """128-bit xxh3 digest of each page, as (lo, hi) uint64 columns."""
    mv = memoryview(data)
    h = xxhash.xxh3_128_digest
    raw = b"".join([h(mv[o : o + PAGE_SIZE]) for o in range(0, n * PAGE_SIZE, PAGE_SIZE)])
    a = np.frombuffer(raw, dtype=">u8").reshape(n, 2).astype(np.uint64)
    return a[:, 1].copy(), a[:, 0].copy()


class Ksm:
    """ksm_crawld + ksmd + the sysfs-visible state of one LKSM instance."""

    def __init__(
        self,
        source: MemorySource,
        *,
        filter_enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        self_pid: int | None = None,
    ) -> None:
        self.source = source
        self.filter_enabled = filter_enabled
        self.clock = clock
        self.self_pid = self_pid
        self.tunables = Tunables()

        self.stable = StableTree()
        self.unstable = HashIndex()  # root_unstable_tree, rebuilt every round
        self._unstable_hint = 0  # entries the last round's tree ended with
        self.regions = RegionTable()

        self.slots: dict[TaskId, MmSlot] = {}  # mm_slots_hash / ksm_mm_head.mm_list
        self._by_sid: dict[int, MmSlot] = {}
        self._next_sid = 1
        self.scan_list = ScanList()  # ksm_scan_head.scan_list
        self.remove_list: list[MmSlot] = []  # ksm_scan.remove_mm_list
        self.frozen_tasks: dict[TaskId, None] = {}  # frozen_task_list
        self.vips: dict[int, MmSlot] = {}  # vips_list, ordered on use
        self._vip_seq = 0

        # struct ksm_scan
        self.cur: MmSlot | None = None
        self.scan_round = 0
        self.crawl_round = 0  # ksm_crawl_round
        self.nr_full_scan = 0
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_state = False  # ksm_state: 1 while the scanner owns a scan
        self._at_head = True  # ksm_scan.mm_slot == &ksm_scan_head: between two passes

        # counters
        self.pages_unshared = 0
        self.rmap_items = 0
        self.pages_scanned = 0
        self.ksm_zero_pages = 0
        self.nr_added_process = 0  # scanning_process
        self.lksm_nr_merged = 0
        self.lksm_nr_broken = 0
        self.lksm_nr_scanned_slot = 0
        self.slot_nr_merged = 0
        self.slot_nr_broken = 0
        self.tasks_exited = 0  # slots dropped because the task went away
        self.tasks_denied = 0  # tasks skipped or dropped because /proc refused access
        self.last_scan: dict[str, float | int] = {}

        # crawler
        self._phase = _WAIT_RUN
        self._next_fscan = 0.0
        self._partial_at: float | None = None
        self._last_prune = clock()

        # scanner
        self._gen: Generator[int, None, None] | None = None
        self._budget = 0
        self._scan_started = False
        self._scan_begin = 0.0
        self._scan_pages_at_begin = 0
        self._cur_new: Rmap | None = None  # the new rmap list of the slot being scanned
        self._cur_valid = 0
        self._sync = False

        self._scan_region = -1  # ksm_scan.region: the region the scanner used last

        self._snapshot: dict[str, int] = {}
        self._publish()

    # ===================================================================== ABI ==

    def counters(self) -> dict[str, int]:
        """Lock-free snapshot of the read-only attributes (published at consistent points)."""
        return self._snapshot

    def region_share(self) -> dict[str, int]:
        return self.regions.share()

    def has_stable_nodes(self) -> bool:
        return self.stable.nr_nodes > 0

    def set_tunable(self, name: str, value: int) -> None:
        setattr(self.tunables, name, value)

    def set_run(self, flags: int) -> None:
        """run_store() after validation: 8 is stored as merge + one-shot."""
        t = self.tunables
        if t.run != flags:
            t.run = KSM_RUN_MERGE | KSM_RUN_ONESHOT if flags == KSM_RUN_ONESHOT else flags
            if flags & KSM_RUN_UNMERGE:
                self._unmerge_and_remove_all_rmap_items()

    def request_one_shot(self, mode: int) -> bool:
        """one_shot_scanning_store(): the cmpxchg from NONE; False while one is pending."""
        if self.tunables.one_shot_scanning != LKSM_SCAN_NONE:
            return False
        self.tunables.one_shot_scanning = mode
        return True

    def per_process(self) -> list[dict[str, int | str]]:
        """Per mm_slot figures in the style of mainline's /proc/PID/ksm_stat."""
        out: list[dict[str, int | str]] = []
        for slot in list(self.slots.values()):
            rmap = slot.rmap
            merging = int(np.count_nonzero(rmap.flags & STABLE))
            zero = int(slot.zero_vpns.shape[0])
            items = len(rmap)
            out.append(
                {
                    "pid": slot.task.pid,
                    "start_time": slot.task.start_time,
                    "comm": slot.comm,
                    "state": slot.state_names(),
                    "rmap_items": items,
                    "merging_pages": merging,
                    "zero_pages": zero,
                    "profit": (merging + zero) * PAGE_SIZE - items * RMAP_ITEM_SIZE,
                    "nr_merged_window": slot.nr_merged,
                }
            )
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of per-page engine state (rmap columns, trees)."""
        rm = sum(s.rmap.nbytes + s.zero_vpns.nbytes for s in self.slots.values())
        return rm + self.stable.nbytes + self.unstable.nbytes

    def _publish(self) -> None:
        shared = self.stable.pages_shared
        sharing = self.stable.pages_sharing
        unshared = self.pages_unshared
        items = self.rmap_items
        self._snapshot = {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": max(0, items - shared - sharing - unshared),
            "full_scans": self.nr_full_scan,
            "stable_node_chains": self.stable.stable_node_chains,
            "stable_node_dups": self.stable.stable_node_dups,
            "scanning_process": self.nr_added_process,
            "nr_regions": self.regions.nr_regions,
            "pages_scanned": self.pages_scanned,
            "general_profit": (sharing + self.ksm_zero_pages) * PAGE_SIZE - items * RMAP_ITEM_SIZE,
            "ksm_zero_pages": self.ksm_zero_pages,
            "rmap_items": items,
            "tasks_exited": self.tasks_exited,
            "tasks_denied": self.tasks_denied,
        }

    # ================================================================ crawler ==

    def crawl(self, now: float) -> float | None:
        """One pass of lksm_crawl_thread at monotonic time `now`.

        Returns when it wants to run next, or None to sleep until woken (a store to run
        or one_shot_scanning, a hint, or the end of a scan).
        """
        t = self.tunables
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
            if not self.scan_state and now >= self._next_fscan:
                if self.prepare_full_scan(now) > 0:
                    self._wake_scanner()
                self._next_fscan = now + CRAWLER_SLEEP_S
            if self.crawl_round < INITIAL_ROUND:
                return now + CRAWLER_SLEEP_S if self.scan_state else max(self._next_fscan, now)
            t.full_scan_interval = DEFAULT_FULL_SCAN_INTERVAL
            self._next_fscan = now + t.full_scan_interval / 1000
            self._phase = _NORMAL
            return None if self.scan_state else now
        # normal operation loop
        if t.run & KSM_RUN_ONESHOT:
            if self.scan_state:
                return None  # wait until scanning is done
            return self._crawl_once(now)
        if t.run & KSM_RUN_MERGE:
            if self.scan_state:
                return now + CRAWLER_SLEEP_S
            return self._crawl_periodic(now)
        self._partial_at = None
        return None

    def _crawl_once(self, now: float) -> float | None:
        """lksm_do_crawl_once(): wait for a one_shot_scanning request, then prepare it."""
        t = self.tunables
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
            self._wake_scanner()
        else:  # "No one can be scanned!"
            t.one_shot_scanning = LKSM_SCAN_NONE
            self._nothing_to_scan()
        self._publish()
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
        elif self.frozen_tasks or self.nr_queued():
            self._partial_at = now + LKSM_CRAWL_FROZEN_EVENT_WAIT_S
            return self._partial_at
        else:
            return min(self._next_fscan, now + CRAWLER_SLEEP_S)
        self._publish()
        if nr_added > 0:
            self._wake_scanner()
            return now + CRAWLER_SLEEP_S
        # nothing to scan: wait for events rather than prepare again at once (a
        # full_scan_interval of 0 with no process would make the seed's loop spin)
        self._nothing_to_scan()
        return now + CRAWLER_SLEEP_S

    def _nothing_to_scan(self) -> None:
        """A prepared scan that queued nobody: the scanner is not woken.  Exited slots
        stay on the remove list: only a scanner's wrap-up frees them
        (lksm_scan_wrapup_wait)."""
        self.scan_mode = LKSM_SCAN_NONE

    def _wake_scanner(self) -> None:
        """lksm_wake_up_scan_thread()."""
        self.scan_state = True
        self._scan_started = False

    # ---------------------------------------------------------- task discovery --

    def _live_tasks(self) -> list[TaskId]:
        """for_each_process() less ourselves: every task the source may scan.  Registered
        slots whose task is gone (or left the scope) take the __ksm_exit() path here."""
        tasks = [t for t in self.source.tasks() if t.pid != self.self_pid and t.pid != 0]
        alive = set(tasks)
        for task, slot in list(self.slots.items()):
            if task not in alive:
                self._ksm_exit(slot)
        return tasks

    def _short_task(self, task: TaskId) -> tuple[bool, int, int, str] | None:
        """check_short_task(): None when the task is gone or unreadable, else
        (is_short, faults, anon_pages, comm)."""
        try:
            st = self.source.stat(task)
        except ProcessGone:
            return None
        except AccessDenied:
            self.tasks_denied += 1
            return None
        if st.kthread:
            return None
        return st.runtime_ns < KSM_SHORT_TASK_TIME_MS * 1_000_000, st.faults, st.anon_pages, st.comm

    def _alloc_slot(self, task: TaskId, comm: str, faults: int, anon: int, frozen: bool) -> MmSlot:
        """__ksm_enter_alloc_slot(): registered, and queued at the tail of the scan list."""
        slot = MmSlot(self._next_sid, task, comm, frozen)
        self._next_sid += 1
        slot.fault_cnt = faults
        slot.scanning_size = anon
        self.slots[task] = slot
        self._by_sid[slot.sid] = slot
        if not self.tunables.run & KSM_RUN_UNMERGE:
            self.scan_list.add_tail(slot)
        self.nr_added_process += 1
        return slot

    def _ksm_join(
        self, task: TaskId, frozen: bool, info: tuple[bool, int, int, str] | None = None
    ) -> tuple[MmSlot | None, bool]:
        """ksm_join(): register the task (if new) and mark its VMAs mergeable.
        Returns (slot, newly_allocated); slot None when the task cannot be joined."""
        slot = self.slots.get(task)
        new = slot is None
        if slot is None:
            info = info if info is not None else self._short_task(task)
            if info is None:
                return None, False
            _, faults, anon, comm = info
            slot = self._alloc_slot(task, comm, faults, anon, frozen)
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
        try:
            maps = self.source.mappings(slot.task)
        except _SourceError:
            return  # the scanner will take the exit path
        marked = slot.marked
        now: list[tuple[int, int, tuple[int, int] | None]] = []
        for i, vma in enumerate(maps):
            if not vma.mergeable:
                continue
            now.append((vma.start, vma.end, vma.file))
            if marked.covers(vma.start, vma.end, vma.file):
                continue  # already VM_MERGEABLE: ksm_join() skips it
            if not self.filter_enabled or not RegionTable.is_file_anon_candidate(vma):
                continue
            rid = self.regions.register(maps, i, self.crawl_round)
            if rid is not None and rid not in slot.regions:
                slot.regions.add(rid)
                self.regions.ref(rid)
        slot.marked = MarkedVmas(now)

    def _join_newcomers(self, tasks: list[TaskId]) -> int:
        """The for_each_process() loop of both prepare functions: every task that is not
        short joins (new ones get a slot, known ones get their new VMAs marked)."""
        nr_added = 0
        for task in tasks:
            info = None
            if task not in self.slots:
                info = self._short_task(task)
                if info is None or info[0]:
                    continue
            _, new = self._ksm_join(task, frozen=False, info=info)
            nr_added += new
        return nr_added

    # ------------------------------------------------------------ preparation --

    @property
    def nr_frozen(self) -> int:
        """ksm_scan.nr_frozen: frozen slots waiting for their scan."""
        return sum(1 for s in self.scan_list if s.test(KSM_MM_FROZEN))

    def nr_queued(self) -> int:
        """Slots the scanner still has to visit in this pass (the cursor's one included)."""
        return len(self.scan_list) + (self._gen is not None)

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
        tasks = list(self.frozen_tasks)
        self.frozen_tasks.clear()
        if self.tunables.run & KSM_RUN_UNMERGE:
            return 0
        nr_added = 0
        for task in tasks:
            if task not in alive:
                continue
            slot, new = self._ksm_join(task, frozen=True)
            nr_added += slot is not None and new
        return nr_added

    def _prepare(self, mode: int) -> tuple[list[TaskId], int] | None:
        """The common head of both prepare functions: the live tasks, the frozen list,
        then every other task joins.  None when run=2 aborts the preparation."""
        if self.tunables.run & KSM_RUN_UNMERGE:
            return None
        tasks = self._live_tasks()
        self._prepare_frozen_scan(set(tasks))
        nr_added = self._join_newcomers(tasks)
        self.scan_mode = mode
        return tasks, nr_added

    def _prepared(self) -> int:
        """The end of both prepare functions.  What the scanner will visit is what is
        queued, so that is the count: a prepared scan with nobody queued ends at once
        ("No one can be scanned!"), whatever hints or exits happened meanwhile."""
        self.crawl_round += 1
        self._publish()
        return self.nr_queued()

    def prepare_full_scan(self, now: float | None = None) -> int:
        """lksm_prepare_full_scan(): frozen list + every process, all slots queued.
        Returns the number of slots queued."""
        now = self.clock() if now is None else now
        if self._prepare(LKSM_SCAN_FULL) is None:
            return 0
        # lksm_count_and_clear_mm_slots()
        delay = 0.0
        for slot in self.slots.values():
            if slot not in self.scan_list and slot is not self.cur:
                slot.clear(KSM_MM_SCANNED)
                slot.nr_scans = 0
                self.scan_list.add_tail(slot)
                delay += slot.elapsed
        self._next_fscan = now + delay + self.tunables.full_scan_interval / 1000
        return self._prepared()

    def prepare_partial_scan(self) -> int:
        """lksm_prepare_partial_scan(): frozen tasks + newcomers + up to lksm_max_vips
        VIPs by merge window, skipping VIPs whose fault count has not moved.  Returns
        the number of slots queued."""
        prepared = self._prepare(LKSM_SCAN_PARTIAL)
        if prepared is None:
            return 0
        _, nr_added = prepared
        nr_frozen = self.nr_frozen
        nr_scannable = 0
        if nr_added + nr_frozen < LKSM_MAX_VIPS:
            recheck: list[MmSlot] = []
            for slot in sorted(self.vips.values(), key=lambda s: (-s.nr_merged, s.vip_seq)):
                if nr_scannable + nr_added + nr_frozen >= LKSM_MAX_VIPS:
                    break
                if slot.removed or not slot.test(KSM_MM_LISTED):
                    continue
                try:  # pruning by fault count
                    st = self.source.stat(slot.task)
                except _SourceError:
                    self._ksm_exit(slot)
                    continue
                if st.faults == slot.fault_cnt:
                    continue
                slot.fault_cnt = st.faults
                slot.scanning_size = st.anon_pages
                slot.nr_scans = 0
                slot.clear(KSM_MM_SCANNED)
                recheck.append(slot)
                nr_scannable += 1
            if self.filter_enabled:
                for slot in recheck:  # check new maps
                    self._mark_mergeable(slot)
            for slot in reversed(recheck):  # list_splice() onto the head
                self.scan_list.remove(slot)
                self.scan_list.add_head(slot)
        return self._prepared()

    # ================================================================== hints ==

    def hint(self, task: TaskId, frozen: bool) -> None:
        """lksm_hint(): the freezer told us a task froze or thawed."""
        if frozen:
            self._task_frozen(task)
        else:
            self._task_thawed(task)
        self._publish()

    def _task_frozen(self, task: TaskId) -> None:
        slot = self.slots.get(task)
        if slot is not None:
            if slot is not self.cur and slot.test(KSM_MM_LISTED):
                self.scan_list.add_tail(slot)
                slot.clear(KSM_MM_LISTED)
                slot.set(KSM_MM_FROZEN)
        elif not slot_removed(task, self.remove_list):
            self.frozen_tasks[task] = None

    def _task_thawed(self, task: TaskId) -> None:
        slot = self.slots.get(task)
        if slot is not None:
            if slot.test(KSM_MM_FROZEN) and slot is not self.cur:
                if slot.test(KSM_MM_SCANNED):
                    self.scan_list.remove(slot)
                slot.clear(KSM_MM_FROZEN)
                slot.set(KSM_MM_LISTED)
        else:
            self.frozen_tasks.pop(task, None)

    def task_exit(self, task: TaskId) -> None:
        """ksm_exit() for a task we learnt has gone."""
        self.frozen_tasks.pop(task, None)
        slot = self.slots.get(task)
        if slot is not None:
            self._ksm_exit(slot)
        self._publish()

    def _ksm_exit(self, slot: MmSlot) -> None:
        """__ksm_exit(): forget the task; a slot with rmap items is freed only when the
        current scan ends (lksm_remove_mm_slot -> remove_mm_list)."""
        if slot is self.cur:
            return  # the scanner sees the exit itself
        self.nr_added_process -= 1
        self.tasks_exited += 1
        self.frozen_tasks.pop(slot.task, None)
        if not len(slot.rmap) and not slot.zero_vpns.size:
            self._unlink_slot(slot)
            self._free_slot(slot)
        else:
            self._remove_mm_slot(slot)

    def _unlink_slot(self, slot: MmSlot) -> None:
        self.slots.pop(slot.task, None)
        self._by_sid.pop(slot.sid, None)
        self.scan_list.remove(slot)
        self.vips.pop(slot.sid, None)
        slot.vip_seq = -1
        slot.removed = True

    def _remove_mm_slot(self, slot: MmSlot) -> None:
        """lksm_remove_mm_slot(): off every list, onto the remove list."""
        self._unlink_slot(slot)
        self.remove_list.append(slot)

    def _free_slot(self, slot: MmSlot) -> None:
        """The per-slot part of lksm_flush_removed_mm_list()."""
        self._remove_items(slot.rmap)
        slot.rmap = Rmap()
        self.ksm_zero_pages -= int(slot.zero_vpns.shape[0])
        slot.zero_vpns = slot.zero_vpns[:0]
        for rid in slot.regions:
            self.regions.unref(rid)
        slot.regions.clear()
        try:
            self.source.release(slot.task)
        except Exception:  # noqa: BLE001 - a source failing to forget must not stop the engine
            log.exception("release(%s) failed", slot.task)

    def _flush_removed_mm_list(self) -> None:
        removed, self.remove_list = self.remove_list, []
        for slot in removed:
            self._free_slot(slot)

    # ================================================================ scanner ==

    def scanner_should_run(self) -> bool:
        """Does the scanner thread have work: a scan has been handed over (ksm_state).

        Whatever else happened since, the scanner then always reaches the end of the
        scan: it scans while merging is on and something is queued, and otherwise wraps
        the scan up (lksm_scan_thread's two lksm_scan_wrapup_wait() paths), so an
        accepted request can never be left pending by exits, hints or run changes."""
        return self.scan_state

    def scan_batch(self, npages: int | None = None) -> None:
        """ksm_do_scan(pages_to_scan), then the end-of-scan work when the list is empty,
        or the wrap-up of an interrupted scan when merging was turned off."""
        t = self.tunables
        if not self.scan_state:
            return
        if not (t.run & KSM_RUN_MERGE or self._sync):
            # run=0 in the middle of a scan: !ksmd_should_run() -> the scan is wrapped
            # up and counted; the cursor and the queue stay, so the scan goes on from
            # where it was once merging is back and the crawler prepares again
            self._finish_scan(interrupted=True)
            self._publish()
            return
        if not self._scan_started:
            self._scan_started = True
            self._scan_begin = time.perf_counter()
            self._scan_pages_at_begin = self.pages_scanned
            if self.scan_mode == LKSM_SCAN_PARTIAL:
                t.pages_to_scan = t.scan_boost
        self._do_scan(npages if npages is not None else t.pages_to_scan)
        if self._gen is None and not len(self.scan_list):
            self._finish_scan()
        self._publish()

    def _do_scan(self, budget: int) -> None:
        scanned = 0
        while scanned < budget:
            if self._gen is None:
                slot = self._next_slot()
                if slot is None:
                    return
                self._gen = self._scan_slot(slot)
            self._budget = budget - scanned
            try:
                scanned += next(self._gen)
            except StopIteration:
                self._gen = None
                self.cur = None

    def _next_slot(self) -> MmSlot | None:
        """scan_get_next_rmap_item(): at the list head a new round resets the unstable
        tree; then lksm_get_unscanned_mm_slot()."""
        if not len(self.scan_list):
            self._at_head = True
            return None
        if self._at_head and self.scan_round < self.crawl_round:
            self.scan_round = self.crawl_round
            # sized like the last round's tree: no rehashing while it fills again
            self.unstable = HashIndex(max(1024, self._unstable_hint))
            self._maybe_prune_chains()
        self._at_head = False
        slot = self.scan_list.pop_first()
        if slot is None:
            return None
        self.lksm_nr_scanned_slot += 1
        self.cur = slot
        return slot

    def _maybe_prune_chains(self) -> None:
        now = self.clock()
        if (now - self._last_prune) * 1000 >= self.tunables.stable_node_chains_prune_millisecs:
            self._last_prune = now
            self.stable.prune_chains(self.tunables.max_page_sharing)

    def _finish_scan(self, interrupted: bool = False) -> None:
        """lksm_flush_removed_mm_list() + lksm_scan_wrapup_wait().  An `interrupted`
        scan (run lost its merge bit) keeps its cursor, queue and unstable tree."""
        t = self.tunables
        self._flush_removed_mm_list()
        elapsed = time.perf_counter() - self._scan_begin
        self.last_scan = {
            "mode": self.scan_mode,
            "slots_scanned": self.lksm_nr_scanned_slot,
            "pages_scanned": self.pages_scanned - self._scan_pages_at_begin,
            "merged": self.lksm_nr_merged,
            "broken": self.lksm_nr_broken,
            "wall_s": elapsed,
        }
        if self.scan_mode == LKSM_SCAN_PARTIAL:
            t.pages_to_scan = 100  # lksm_default_pages_to_scan
        elif self.scan_mode == LKSM_SCAN_FULL:
            self.nr_full_scan += 1
        self.lksm_nr_merged = self.lksm_nr_broken = self.lksm_nr_scanned_slot = 0
        if not interrupted:
            self._at_head = True
            # nothing reads this round's unstable tree once the scan is over: give it back
            self._unstable_hint = len(self.unstable)
            self.unstable = HashIndex()
        self.scan_mode = LKSM_SCAN_NONE
        if t.run & KSM_RUN_ONESHOT:
            t.one_shot_scanning = LKSM_SCAN_NONE
        self.scan_state = False
        self._scan_started = False

    # -- one slot ----------------------------------------------------------------

    def _scan_slot(self, slot: MmSlot) -> Generator[int, None, None]:
        """Scan one mm_slot from its first VMA to its last, yielding pages scanned per
        chunk (the scanner's cursor lives in this generator's frame).

        The present anonymous pages of every VMA are listed first, so the slot's new
        rmap list is allocated once (an upper bound: the filter and the zero page only
        remove pages) and filled in place; each VMA's region, size checks and filter are
        decided when the scanner reaches it, as lksm_find_next_vma() does.
        """
        begin = self.clock()
        old = slot.rmap
        pos = 0
        filled = 0
        new = Rmap()
        zero_kept: list[np.ndarray] = []
        prev_zero, slot.zero_vpns = slot.zero_vpns, slot.zero_vpns[:0]
        self._scan_region = -1  # ksm_scan.region is NULL when a slot starts
        try:
            maps = self.source.mappings(slot.task)
            present = [
                (i, self.source.present_anon(slot.task, vma.start_vpn, vma.end_vpn))
                for i, vma in enumerate(maps)
                if vma.mergeable and vma.has_anon
            ]
            new = Rmap(sum(int(v.shape[0]) for _, v in present))
            self._cur_new = new
            for i, vpns in present:
                vma = maps[i]
                if prev_zero.size:
                    vpns = self._zero_page_check(slot, prev_zero, vma.start_vpn, vma.end_vpn, vpns, zero_kept)
                for rid, run, event in self._walk_vma(slot, maps, i, vpns):
                    if event is not None:
                        event()
                    k = 0
                    while k < run.shape[0]:
                        n = min(max(1, min(CHUNK, self._budget)), int(run.shape[0]) - k)
                        part = new.view(filled, filled + n)
                        part.vpn[:] = run[k : k + n]
                        self._cur_valid = filled + n
                        pos = self._scan_chunk(slot, vma.start_vpn, rid, part, old, pos)
                        filled += n
                        k += n
                        self._publish()
                        yield n
        except _SourceError as e:
            self._remove_items(new.view(0, filled))
            self._remove_items(old.take(slice(pos, None)))
            slot.rmap = Rmap()
            self.ksm_zero_pages -= int(prev_zero.shape[0])
            self._slot_gone(slot, e)
            return
        finally:
            self._cur_new = None
            self._cur_valid = 0
        # remove_trailing_rmap_items()
        self._remove_items(old.take(slice(pos, None)))
        slot.rmap = new if filled == len(new) else new.copy(filled)
        kept = np.concatenate(zero_kept) if zero_kept else prev_zero[:0]
        self.ksm_zero_pages -= int(prev_zero.shape[0] - kept.shape[0])
        slot.zero_vpns = np.union1d(kept, slot.zero_vpns)
        self._slot_done(slot, self.clock() - begin)

    def _walk_vma(
        self, slot: MmSlot, maps: list[Mapping], i: int, vpns: np.ndarray
    ) -> list[tuple[int, np.ndarray, Callable[[], None] | None]]:
        """lksm_find_next_vma() and the filter of __scan_next_rmap_item() for maps[i]:
        the present pages the scanner visits, as runs of (region, pages, what happens
        to the region first).

        The seed runs the region size check once per call, that is once before each
        page it returns and once more when the VMA is exhausted.  A larger mapping
        resizes the region at the first check and agrees with it afterwards; a smaller
        one is never resized, so its second check - right after its first visited page -
        is the region's second conflict: that page still belongs to the (now conflicted)
        region, every later one to the unknown region, unfiltered.  `_scan_region`
        follows ksm_scan.region, which lksm_find_region() consults for the next VMA.
        """
        if not self.filter_enabled:
            return [(UNKNOWN_REGION, vpns, None)]
        regions = self.regions
        vma = maps[i]
        prior = self._scan_region
        rid = regions.find(maps, i, prior, self.crawl_round)
        if rid != HEAP_REGION and not regions.is_file(rid):
            rid = UNKNOWN_REGION  # NULL or conflicted: the unknown region
        if not regions.is_file(rid):
            self._scan_region = rid
            return [(rid, vpns, None)]
        if not regions.size_check(rid, vma.npages):
            # conflicted at the first check; the seed then keeps the stale
            # ksm_scan.region for this page (the previous VMA's region, or NULL): the
            # unknown region, as its comment intends
            self._scan_region = UNKNOWN_REGION if vpns.size else prior
            return [(UNKNOWN_REGION, vpns, None)]
        sel = vpns
        if slot_filtering_allowed(slot) and regions.use_filter(rid, self.scan_round):
            region = regions.get(rid)
            if region.filter_cnt > 0:
                offs = (vpns - np.uint64(vma.start_vpn)).astype(np.int64)
                sel = vpns[region.filtered_offsets(offs)]
            else:
                sel = vpns[:0]  # an emptied filter skips the whole mapping
        self._scan_region = rid
        if not regions.size_mismatch(rid, vma.npages) or not sel.size:
            return [(rid, sel, None)]
        # a smaller mapping: the check after its first visited page conflicts the region
        first = sel[:1]
        rest = vpns[vpns > first[0]]
        self._scan_region = UNKNOWN_REGION if rest.size > 1 else rid
        return [
            (rid, first, None),
            (rid, rest[:1], lambda: self._conflict(rid, vma.npages)),
            (UNKNOWN_REGION, rest[1:], None),
        ]

    def _conflict(self, rid: int, npages: int) -> None:
        conflicted = not self.regions.size_check(rid, npages)
        assert conflicted, "a smaller mapping's second size check conflicts its region"

    def _slot_gone(self, slot: MmSlot, err: Exception) -> None:
        """The task exited (or shut us out) mid-scan: its items are gone, the slot goes
        to the remove list."""
        if isinstance(err, AccessDenied):
            self.tasks_denied += 1
        else:
            self.tasks_exited += 1
        self.nr_added_process -= 1
        self._remove_mm_slot(slot)
        self.slot_nr_merged = self.slot_nr_broken = 0

    def _slot_done(self, slot: MmSlot, elapsed: float) -> None:
        """The end of a slot in scan_get_next_rmap_item(): newcomer and frozen states
        end, the merge window moves, and the slot is (re)placed in the VIP order."""
        slot.clear(KSM_MM_NEWCOMER | KSM_MM_FROZEN)
        slot.set(KSM_MM_SCANNED)
        self.vips.pop(slot.sid, None)
        if slot.account_nr_merge(self.slot_nr_merged):
            slot.vip_seq = self._vip_seq
            self._vip_seq += 1
            self.vips[slot.sid] = slot
        else:
            slot.vip_seq = -1
        slot.elapsed = elapsed
        self.slot_nr_merged = self.slot_nr_broken = 0

    def _zero_page_check(
        self, slot: MmSlot, zero: np.ndarray, start: int, end: int, vpns: np.ndarray, kept: list[np.ndarray]
    ) -> np.ndarray:
        """Pages merged with the zero page are the zero page while they stay zero (not
        anonymous: follow_page() skips them); a write brings them back as anon pages."""
        z = zero
        z = z[(z >= np.uint64(start)) & (z < np.uint64(end))]
        z = z[np.isin(z, vpns)]
        if not z.size:
            return vpns
        data = self.source.read_pages(slot.task, z)
        lo, hi = digest_pages(data, int(z.shape[0]))
        still = (lo == np.uint64(_ZERO_LO)) & (hi == np.uint64(_ZERO_HI))
        kept.append(z[still])
        return vpns[~np.isin(vpns, z[still])]

    # -- one chunk: cmp_and_merge_page() over up to CHUNK pages --------------------

    def _scan_chunk(self, slot: MmSlot, vma_start: int, rid: int, part: Rmap, old: Rmap, pos: int) -> int:
        """get_next_rmap_item() + cmp_and_merge_page() for the pages of `part`, a view of
        the slot's new rmap list whose vpn column is already set."""
        vpns = part.vpn
        n = int(vpns.shape[0])
        data: memoryview | bytes = self.source.read_pages(slot.task, vpns)
        lo, hi = digest_pages(data, n)

        # get_next_rmap_item(): reuse items at these addresses, free the ones passed by
        end = int(np.searchsorted(old.vpn, vpns[-1], side="right"))
        seg = old.vpn[pos:end]
        j = np.searchsorted(seg, vpns)
        jc = np.minimum(j, max(seg.shape[0] - 1, 0))
        matched = (j < seg.shape[0]) & (seg[jc] == vpns) if seg.shape[0] else np.zeros(n, dtype=bool)
        keep = np.zeros(seg.shape[0], dtype=bool)
        keep[j[matched]] = True
        if not keep.all():
            self._remove_items(old.take(pos + np.flatnonzero(~keep)))

        part.region[:] = rid
        part.off[:] = (vpns - np.uint64(vma_start)).astype(np.uint32)
        if matched.any():
            src = pos + j[matched]
            part.flags[matched] = old.flags[src]
            part.seq[matched] = old.seq[src]
            part.cksum[matched] = old.cksum[src]
            part.node[matched] = old.node[src]
            part.region[matched] = old.region[src]
            part.off[matched] = old.off[src]
        self.rmap_items += n - int(np.count_nonzero(matched))
        flags = part.flags
        if slot.test(KSM_MM_FROZEN):
            # an old item keeps the frozen bit only if it sat in the unstable tree
            frozen = ~matched | ((flags & UNSTABLE) != 0)
            flags[frozen] |= FROZEN
            flags[~frozen] &= _NOT_FROZEN
        else:
            flags &= _NOT_FROZEN
        self.pages_scanned += n
        slot.nr_scans += n

        # cmp_and_merge_page(): an unchanged KSM page is left alone
        is_stable = (flags & STABLE) != 0
        node = np.where(is_stable, part.node, 0)
        stable_ok = is_stable & (self.stable.lo[node] == lo) & (self.stable.hi[node] == hi)
        idx = np.flatnonzero(~stable_ok)
        if idx.size:
            self._cmp_and_merge_pages(slot, part, idx, lo, hi, data, vma_start, rid)
        return end

    def _cmp_and_merge_pages(
        self, slot: MmSlot, part: Rmap, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray,
        data: memoryview | bytes, vma_start: int, rid: int,
    ) -> None:
        """cmp_and_merge_page() for the pages of a chunk that are not unchanged KSM pages.

        The outcome for a page depends on other pages only through content it shares
        with them.  So pages whose content no other page of this chunk has are settled
        together, vectorised, by what they find in the trees as the chunk starts:
        joining a stable node with room (J), passing or failing the checksum gate,
        merging with their unstable tree partner after a byte comparison (M), or
        entering the unstable tree.  What remains (duplicates within the chunk, broken
        merges, chains, full nodes, zero pages) goes one page at a time, in address order.
        """
        t = self.tunables
        flags = part.flags
        klo = normkey(lo[idx])
        sref = self.stable.index.get_many(klo)
        uref = self.unstable.get_many(klo)
        _, inv, counts = np.unique(klo, return_inverse=True, return_counts=True)
        dup = counts[inv] > 1
        cur_seq = self.scan_round & SEQNR_MASK
        fl = flags[idx]
        old_stable = (fl & STABLE) != 0
        slow = old_stable | (((fl & UNSTABLE) != 0) & (part.seq[idx] == cur_seq))

        # J: stable_tree_search() finds a plain node with room
        plain = sref >= 0
        sn = np.where(plain, sref, 0)
        join = plain & ~dup & ~slow & (self.stable.hi[sn] == hi[idx]) & (self.stable.nlen[sn] < t.max_page_sharing)
        if old_stable.any() and join.any():
            # a node losing a mapping here may go away first: keep the address order
            join &= ~np.isin(sn, part.node[idx[old_stable]])
        slow |= (sref != -1) & ~join
        if join.any():
            self._join_stable(slot, part, idx[join], sn[join], vma_start, rid)

        rest = ~join & ~slow
        if not rest.any():
            self._merge_one_by_one(slot, part, idx[slow], lo, hi, data, vma_start, rid)
            return
        # remove_rmap_item_from_tree() for items left in last round's unstable tree
        r = idx[rest]
        was = (flags[r] & UNSTABLE) != 0
        self.pages_unshared -= int(np.count_nonzero(was))
        flags[r] &= _NOT_UNSTABLE
        # the checksum gate: only during the initial rounds, never for frozen tasks
        if self.scan_round < INITIAL_ROUND:
            new_ck = (hi[idx] & _CKSUM_MASK).astype(np.uint32)
            fail = rest & ((fl & FROZEN) == 0) & (part.cksum[idx] != new_ck)
            part.cksum[idx[fail]] = new_ck[fail]
            rest &= ~fail
        if t.use_zero_pages:
            zero = rest & (lo[idx] == np.uint64(_ZERO_LO)) & (hi[idx] == np.uint64(_ZERO_HI))
            slow |= zero
            rest &= ~zero
        slow |= rest & dup
        rest &= ~dup
        # M: unstable_tree_search_insert() finds a partner; merged after memcmp
        cand = rest & (uref >= 0)
        if cand.any():
            data = bytes(data)  # partner reads reuse the source's buffer
            merged = self._merge_with_tree(slot, part, idx[cand], uref[cand], lo, hi, data, vma_start, rid)
            sel = np.flatnonzero(cand)
            slow[sel[~merged]] = True
            rest[sel] = False
        ins = idx[rest]
        if ins.size:
            flags[ins] |= UNSTABLE
            part.seq[ins] = cur_seq
            part.region[ins] = rid
            part.off[ins] = (part.vpn[ins] - np.uint64(vma_start)).astype(np.uint32)
            refs = (np.int64(slot.sid) << _VPN_BITS) | part.vpn[ins].astype(np.int64)
            self.unstable.put_many(normkey(lo[ins]), refs)
            self.pages_unshared += int(ins.shape[0])
        self._merge_one_by_one(slot, part, idx[slow], lo, hi, data, vma_start, rid)

    def _merge_one_by_one(
        self, slot: MmSlot, part: Rmap, s: np.ndarray, lo: np.ndarray, hi: np.ndarray,
        data: memoryview | bytes, vma_start: int, rid: int,
    ) -> None:
        if not s.size:
            return
        # later reads reuse the source's buffer: keep our own copy of these pages
        own = data if isinstance(data, bytes) else bytes(data)
        for i in s.tolist():
            self._cmp_and_merge_page(slot, part, i, int(lo[i]), int(hi[i]), own, vma_start, rid)

    def _join_stable(
        self, slot: MmSlot, part: Rmap, j: np.ndarray, nodes: np.ndarray, vma_start: int, rid: int
    ) -> None:
        """try_to_merge_with_ksm_page() + stable_tree_append() for pages joining distinct
        nodes that have room."""
        flags = part.flags
        was = (flags[j] & UNSTABLE) != 0
        self.pages_unshared -= int(np.count_nonzero(was))
        flags[j] = (flags[j] & _NOT_UNSTABLE) | STABLE
        part.node[j] = nodes
        sharing = self.stable.append_many(nodes)
        self.lksm_nr_merged += sharing
        self.slot_nr_merged += sharing
        if self.filter_enabled:
            offs = (part.vpn[j] - np.uint64(vma_start)).astype(np.int64)
            self.regions.account_merges(np.full(j.shape[0], rid), offs)

    def _merge_with_tree(
        self, slot: MmSlot, part: Rmap, m: np.ndarray, refs: np.ndarray, lo: np.ndarray, hi: np.ndarray,
        data: memoryview | bytes, vma_start: int, rid: int,
    ) -> np.ndarray:
        """try_to_merge_two_pages() + stable_tree_insert() for pages whose unstable tree
        partner is still there and still byte-for-byte equal.  Returns which merged."""
        cur_seq = self.scan_round & SEQNR_MASK
        k = int(m.shape[0])
        ok = np.zeros(k, dtype=bool)
        tblock = np.full(k, -1, dtype=np.int64)
        tidx = np.full(k, -1, dtype=np.int64)
        blocks: list[Rmap] = []
        tsids = refs >> _VPN_BITS
        tvpns = (refs & _VPN_MASK).astype(np.uint64)
        mine = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        for tsid in np.unique(tsids).tolist():
            sel = np.flatnonzero(tsids == tsid)
            tslot = self._by_sid.get(int(tsid))
            if tslot is None:
                continue
            blk = self._current_items() if tslot is slot else tslot.rmap
            if len(blk):
                pos = np.searchsorted(blk.vpn, tvpns[sel])
                posc = np.minimum(pos, len(blk) - 1)
                found = (pos < len(blk)) & (blk.vpn[posc] == tvpns[sel])
                live = found & ((blk.flags[posc] & UNSTABLE) != 0) & (blk.seq[posc] == cur_seq)
                blocks.append(blk)
                tblock[sel[live]] = len(blocks) - 1
                tidx[sel[live]] = posc[live]
            got = sel[tblock[sel] >= 0]
            if not got.size:
                continue
            # get_mergeable_page() + memcmp_pages(), one read for this partner process
            order = np.argsort(tvpns[got], kind="stable")
            got = got[order]
            try:
                theirs = np.frombuffer(
                    bytes(self.source.read_pages(tslot.task, tvpns[got])), dtype=np.uint64
                ).reshape(-1, PAGE_SIZE // 8)
            except _SourceError:
                continue
            ok[got] = (theirs == mine[m[got]]).all(axis=1)
        if not ok.any():
            return ok
        w = m[ok]
        nids = self.stable.insert_many(lo[w], hi[w])
        # the partners leave the unstable tree for the new KSM pages
        self.pages_unshared -= int(w.shape[0])
        for b in np.unique(tblock[ok]).tolist():
            sel = ok & (tblock == b)
            blk = blocks[b]
            ti = tidx[sel]
            blk.flags[ti] = (blk.flags[ti] & _NOT_UNSTABLE) | STABLE
            blk.node[ti] = nids[sel[ok]]
            if self.filter_enabled:
                self.regions.account_merges(blk.region[ti].astype(np.int64), blk.off[ti].astype(np.int64))
        self.stable.append_many(nids)
        # and this page joins each
        flags = part.flags
        was = (flags[w] & UNSTABLE) != 0
        self.pages_unshared -= int(np.count_nonzero(was))
        flags[w] = (flags[w] & _NOT_UNSTABLE) | STABLE
        part.node[w] = nids
        sharing = self.stable.append_many(nids)
        self.lksm_nr_merged += sharing
        self.slot_nr_merged += sharing
        if self.filter_enabled:
            offs = (part.vpn[w] - np.uint64(vma_start)).astype(np.int64)
            self.regions.account_merges(np.full(w.shape[0], rid), offs)
        return ok

    def _cmp_and_merge_page(
        self, slot: MmSlot, part: Rmap, i: int, lo: int, hi: int, data: bytes, vma_start: int,
        rid: int,
    ) -> None:
        """cmp_and_merge_page() for one page (mm/lksm.c)."""
        t = self.tunables
        vpn = int(part.vpn[i])
        off = vpn - vma_start
        flags = int(part.flags[i])
        # stable_tree_search()
        kn = self.stable.search(lo, hi, t.max_page_sharing)
        # remove_rmap_item_from_tree()
        if flags & STABLE:
            if self.stable.remove(int(part.node[i])):
                self.lksm_nr_broken += 1
                self.slot_nr_broken += 1
            flags &= ~int(STABLE)
            part.node[i] = -1
        elif flags & UNSTABLE:
            self.pages_unshared -= 1
            flags &= ~int(UNSTABLE)
        if kn >= 0:
            # try_to_merge_with_ksm_page(): the KSM page's content is its digest
            part.flags[i] = flags | int(STABLE)
            part.node[i] = kn
            if self.stable.append(kn):
                self._merged()
            if self.filter_enabled:
                self.regions.account_merge(rid, off)
            return
        part.flags[i] = flags
        # the checksum gate: only during the initial rounds, never for frozen tasks
        if self.scan_round < INITIAL_ROUND and not flags & int(FROZEN):
            ck = hi & 0xFFFFFFFE
            if int(part.cksum[i]) != ck:
                part.cksum[i] = ck
                return
        page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        if t.use_zero_pages and lo == _ZERO_LO and hi == _ZERO_HI and not any(page):
            # merged with the zero page: no longer anonymous until written again
            slot.zero_vpns = np.union1d(slot.zero_vpns, np.array([vpn], dtype=np.uint64))
            self.ksm_zero_pages += 1
            return
        # unstable_tree_search_insert()
        key = lo if lo >= 2 else lo + 2
        ref = self.unstable.get(key)
        tree = self._tree_item(ref, slot, vpn) if ref >= 0 else None
        if tree is not None:
            tslot, tpart, ti = tree
            tpage = self._read_page(tslot, int(tpart.vpn[ti]))
            if tpage is not None and tpage == page:
                # try_to_merge_two_pages() + stable_tree_insert()
                nid = self.stable.insert(lo, hi)
                self.unstable.delete(key, ref)
                self.pages_unshared -= 1
                tpart.flags[ti] = (int(tpart.flags[ti]) & ~int(UNSTABLE)) | int(STABLE)
                tpart.node[ti] = nid
                self.stable.append(nid)
                part.flags[i] = flags | int(STABLE)
                part.node[i] = nid
                if self.stable.append(nid):
                    self._merged()
                if self.filter_enabled:
                    self.regions.account_merge(int(tpart.region[ti]), int(tpart.off[ti]))
                    self.regions.account_merge(rid, off)
                return
        # insert into the unstable tree (over any stale entry with this content)
        self.unstable.put(key, (slot.sid << _VPN_BITS) | vpn)
        part.flags[i] = flags | int(UNSTABLE)
        part.seq[i] = self.scan_round & SEQNR_MASK
        part.region[i] = rid
        part.off[i] = off
        self.pages_unshared += 1

    def _merged(self) -> None:
        """stable_tree_append() found the page sharing: count it for the slot window."""
        self.lksm_nr_merged += 1
        self.slot_nr_merged += 1

    def _tree_item(self, ref: int, slot: MmSlot, vpn: int) -> tuple[MmSlot, Rmap, int] | None:
        """Resolve an unstable tree entry to a live item of this round, or None for a
        stale one (its slot left, or the item moved on since it was inserted)."""
        tsid = ref >> _VPN_BITS
        tvpn = ref & _VPN_MASK
        if tsid == slot.sid and tvpn == vpn:
            return None
        tslot = self._by_sid.get(tsid)
        if tslot is None:
            return None
        b = self._current_items() if tslot is slot else tslot.rmap
        ti = b.find(tvpn)
        if ti >= 0 and int(b.flags[ti]) & UNSTABLE and int(b.seq[ti]) == self.scan_round & SEQNR_MASK:
            return tslot, b, ti
        return None

    def _current_items(self) -> Rmap:
        """The items of the slot being scanned that are valid so far (this chunk included)."""
        return self._cur_new.view(0, self._cur_valid) if self._cur_new is not None else Rmap()

    def _read_page(self, slot: MmSlot, vpn: int) -> bytes | None:
        """get_mergeable_page() + the bytes for memcmp_pages()."""
        try:
            return bytes(self.source.read_pages(slot.task, np.array([vpn], dtype=np.uint64)))
        except _SourceError:
            return None

    def _remove_items(self, rm: Rmap) -> None:
        """remove_rmap_item_from_tree() + free for a block of items."""
        n = len(rm)
        if not n:
            return
        st = (rm.flags & STABLE) != 0
        if st.any():
            for nid in rm.node[st].tolist():
                if self.stable.remove(nid):
                    self.lksm_nr_broken += 1
                    self.slot_nr_broken += 1
        self.pages_unshared -= int(np.count_nonzero(rm.flags & UNSTABLE))
        self.rmap_items -= n

    # ============================================================== run = 2 ==

    def _unmerge_and_remove_all_rmap_items(self) -> None:
        """unmerge_and_remove_all_rmap_items(): every merge undone and every rmap item
        freed; slots stay registered, queued and in their states.

        The seed leaves ksm_scan.mm_slot on ksm_mm_head, which LKSM's scanner then takes
        for a slot (an oops).  Here the scan in progress is cancelled: its slot goes back
        to the head of the queue, a pending one-shot request is dropped (it reads 0), and
        the queue, the frozen task list and every slot state are kept, so the next
        request (or periodic pass) scans what was waiting, and completes."""
        cur = self.cur if self._gen is not None else None
        if self._gen is not None:
            self._gen.close()
        self._gen = None
        self.cur = None
        self._cur_new = None
        if cur is not None and not cur.removed:
            self.scan_list.add_head(cur)
        self._at_head = True
        for slot in list(self.slots.values()):
            slot.rmap = Rmap()
            slot.zero_vpns = slot.zero_vpns[:0]
        self._flush_removed_mm_list()
        self.stable.clear()
        self.unstable = HashIndex()
        self.pages_unshared = 0
        self.rmap_items = 0
        self.ksm_zero_pages = 0
        self.scan_round = 0
        self.slot_nr_merged = self.slot_nr_broken = 0
        self.lksm_nr_merged = self.lksm_nr_broken = self.lksm_nr_scanned_slot = 0
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_state = False
        self._scan_started = False
        self.tunables.one_shot_scanning = LKSM_SCAN_NONE
        self._partial_at = None
        self._publish()

    # ======================================================= synchronous use ==

    def full_scan(self) -> dict[str, float | int]:
        """Prepare and run one full scan to its end (tests, `lksmfs scan`)."""
        return self._run_sync(self.prepare_full_scan())

    def partial_scan(self) -> dict[str, float | int]:
        """Prepare and run one partial scan to its end."""
        return self._run_sync(self.prepare_partial_scan())

    def _run_sync(self, nr_target: int) -> dict[str, float | int]:
        self._sync = True
        try:
            if nr_target > 0:
                self._wake_scanner()
                while self.scan_state:
                    self.scan_batch(1 << 30)
            else:
                if self.tunables.run & KSM_RUN_ONESHOT:
                    self.tunables.one_shot_scanning = LKSM_SCAN_NONE
                self.last_scan = {"mode": self.scan_mode, "slots_scanned": 0, "pages_scanned": 0,
                                  "merged": 0, "broken": 0, "wall_s": 0.0}
                self._nothing_to_scan()
        finally:
            self._sync = False
        self._publish()
        return dict(self.last_scan)


def slot_filtering_allowed(slot: MmSlot) -> bool:
    """__scan_next_rmap_item(): newcomers and frozen slots are never filtered."""
    return not slot.test(KSM_MM_NEWCOMER | KSM_MM_FROZEN)


def slot_removed(task: TaskId, remove_list: list[MmSlot]) -> bool:
    return any(s.task == task for s in remove_list)
