"""The LKSM engine in shadow mode: the state of one LKSM instance and its ABI.

A faithful port of mm/lksm.c (seed 002_a3a1b2fcd7996b55, with LKSM_FILTER from seed
000_9da3ef7a1f87f7e5) on a 5.4 mm/ksm.c base, with memory read from a `MemorySource`
instead of page tables.  The work is split the way mm/lksm.c splits it:

- the policy (crawler.py, ksm_crawld) decides what to scan and when;
- the scanner (scanner.py, ksmd with its cursor, struct ksm_scan) walks the queue;
- the merger (merge.py, cmp_and_merge_page and friends) changes the trees;
- this class owns what they share (the registered slots, the stable and unstable
  trees, the regions, the counters) and everything sysfs sees.

This class builds the parts and hands each itself, typed as the protocol of
context.py that lists what that part may touch; no part imports this module, so
the engine's imports have no cycle, with this module at the top:

    ksm.Ksm
     |- merge.Merger(MergerCtx) ------- thp.split/merge_fails(ThpCtx)
     |- scanner.Scanner(ScannerCtx) --- merger as MergerForScanner, crawler as ScanPolicy
     |- make_policy():
     |   |- crawler.LksmCrawler(CrawlerCtx)   scanner as ScannerForCrawler
     |   `- ksmd.KsmdPolicy(KsmdCtx)          scanner as ScannerForKsmd,
     |                                        merger as MergerForKsmd
     `- (by `lksmfs compare`) fastpass.FastScanner(FastScanCtx)

The merger sees the scanner as ScannerForMerger and the policy as ScanPolicy;
fastpass drives the scanner as ScannerForFastScan and the merger as MergerForFastScan.
Parts import each other only downwards, for names other than the façade's: merge.py
(SourceError) by the others, crawler.py (SKIP_DENIED) by ksmd.py, ksmd.py (KsmdPolicy,
smart_scan) by fastpass.py, thp.py by merge.py and scanner.py.
Below the parts are modules that import none of them: context (the protocols), and the
leaves it names - pages (digests, Chunk), rmap, slot, stable, unstable, regions, stats
(counters, Record, Skipped), params, advisor - with hashindex, numa and the source
interface (lksmfs.sources.base).

Nothing here sleeps or starts a thread: the daemon calls `crawl(now)` and
`scan_batch()` from its threads, tests call them (or the synchronous `full_scan()` /
`partial_scan()`) directly, and both serialise calls with one lock.

Shadow mode: a "merge" records what the kernel would have done.  A KSM page is the
96-bit digest of the content two pages had when they were compared byte for byte and
merged; a mapped page whose content no longer has that digest was written to, which on
a kernel would have broken COW: its rmap item leaves the stable node (a broken merge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from lksmfs.engine.advisor import AdvisorCtx, set_advisor_defaults
from lksmfs.engine.context import ScanPolicy
from lksmfs.engine.crawler import LksmCrawler
from lksmfs.engine.ksmd import KsmdPolicy, MainlineView
from lksmfs.engine.merge import Merger
from lksmfs.engine.pages import XXH3, Digest
from lksmfs.engine.params import (
    KSM_RUN_MERGE,
    KSM_RUN_ONESHOT,
    KSM_RUN_UNMERGE,
    KSM_SHORT_TASK_TIME_MS,
    LKSM_SCAN_NONE,
    POLICIES,
    POLICY_KSM,
    POLICY_LKSM,
    RMAP_ITEM_SIZE,
    Tunables,
)
from lksmfs.engine.regions import RegionTable
from lksmfs.engine.rmap import GONE, STABLE, Rmap
from lksmfs.engine.scanner import Scanner
from lksmfs.engine.slot import MmList, MmSlot
from lksmfs.engine.stable import StableTree
from lksmfs.engine.stats import KsmStats, Record, Skipped, scan_record
from lksmfs.engine.unstable import UnstableTree
from lksmfs.sources.base import PAGE_SIZE, MemorySource, TaskId

log = logging.getLogger(__name__)


def make_policy(name: str, ksm: Ksm) -> ScanPolicy:
    """The scheduling policy `name` (params.POLICIES) for an engine."""
    if name == POLICY_LKSM:
        return LksmCrawler(ksm)
    if name == POLICY_KSM:
        return KsmdPolicy(ksm)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)} (got {name!r})")


class Ksm:
    """ksm_crawld + ksmd + the sysfs-visible state of one LKSM instance."""

    def __init__(
        self,
        source: MemorySource,
        *,
        filter_enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        self_pid: int | None = None,
        short_task_ms: int = KSM_SHORT_TASK_TIME_MS,
        policy: str = POLICY_LKSM,
        digest: Digest = XXH3,
        scan_cpu_ns: Callable[[], int] = time.thread_time_ns,
    ) -> None:
        """`short_task_ms`: check_short_task()'s threshold (0 scans short tasks too);
        `policy`: LKSM's crawler (`lksm`) or mainline's ksmd (`ksm`); `digest`: how
        page contents are named (lksmfs.engine.pages; tests give weak ones); `scan_cpu_ns`:
        the CPU time the scanner has used, in ns (the KSM advisor's task_sched_runtime();
        the default is the calling thread's, which is the scanner thread where a full scan
        ends)."""
        self.source = source
        self.digest = digest
        # the scheduling policy: LKSM's ksm_crawld, or mainline's ksmd (lksmfs.engine.ksmd)
        self.policy = policy
        self.filter_enabled = filter_enabled and policy == POLICY_LKSM  # CONFIG_LKSM_FILTER
        self.clock = clock
        self.scan_cpu_ns = scan_cpu_ns
        self.self_pid = self_pid
        self.tunables = Tunables()
        self.advisor = AdvisorCtx()  # mainline's KSM advisor (lksmfs.engine.advisor)
        self.stats = KsmStats()
        self.mm = MmList()
        # stable_node_dup()'s clock: chain_prune_time against stable_node_chains_prune_millisecs
        self.stable = StableTree(lambda: (self.clock(), self.tunables.stable_node_chains_prune_millisecs))
        self.unstable = UnstableTree()  # root_unstable_tree, rebuilt every round
        self.regions = RegionTable()
        self.merger = Merger(self)
        self.scanner = Scanner(self)
        self.crawler: ScanPolicy = make_policy(policy, self)
        self.last_scan: Record = {}
        self.short_task_ms = short_task_ms
        self.skipped: dict[TaskId, Skipped] = {}  # what the last prepared scan left out, and why
        self._snapshot: dict[str, int] = {}
        self._region_share: dict[str, int] = {}
        self.publish()

    # -- what the daemon, sysfs and tests see ------------------------------------------

    def counters(self) -> dict[str, int]:
        """Lock-free snapshot of the read-only attributes (published at consistent points)."""
        return self._snapshot

    def region_share(self) -> dict[str, int]:
        """region_share_show(), from the same published snapshot as the counters."""
        return self._region_share

    def has_stable_nodes(self) -> bool:
        return self.stable.nr_nodes > 0

    @property
    def slots(self) -> dict[TaskId, MmSlot]:
        """The registered mm_slots by task."""
        return self.mm.slots

    @property
    def scan_state(self) -> bool:
        """A scan has been handed to the scanner and has not ended."""
        return self.scanner.scan_state

    @property
    def cur(self) -> MmSlot | None:
        """The slot under the scanner's cursor."""
        return self.scanner.cur

    def publish(self) -> None:
        """Take the snapshot that attribute reads serve (no lock needed to read it)."""
        st = self.stats
        shared = self.stable.pages_shared
        sharing = self.stable.pages_sharing
        unshared = st.pages_unshared
        items = st.rmap_items
        self._snapshot = {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": max(0, items - shared - sharing - unshared),
            "full_scans": st.nr_full_scan,
            "stable_node_chains": self.stable.stable_node_chains,
            "stable_node_dups": self.stable.stable_node_dups,
            "scanning_process": st.nr_added_process,
            "nr_regions": self.regions.nr_regions,
            "pages_scanned": st.pages_scanned,
            "pages_skipped": st.pages_skipped,
            "general_profit": (sharing + st.ksm_zero_pages) * PAGE_SIZE - items * RMAP_ITEM_SIZE,
            "ksm_zero_pages": st.ksm_zero_pages,
            "rmap_items": items,
            "tasks_exited": st.tasks_exited,
            "tasks_denied": st.tasks_denied,
            "tasks_failed": st.tasks_failed,
        }
        self._region_share = self.regions.share()

    def per_process(self) -> list[dict[str, int | str]]:
        """Per mm_slot figures in the style of mainline's /proc/PID/ksm_stat (under the
        `ksm` policy with its ksm_merge_any and ksm_mergeable, 1 for yes)."""
        out: list[dict[str, int | str]] = []
        view = self.source if isinstance(self.source, MainlineView) else None
        for slot in list(self.mm.slots.values()):
            # mid-scan, what the scanner has rebuilt so far and the rest of the old list
            lists = self.scanner.items_of(slot)
            merging = sum(int(np.count_nonzero(r.flags & STABLE)) for r in lists)
            zero = self.scanner.zero_pages(slot)
            items = sum(len(r) - int(np.count_nonzero(r.flags & GONE)) for r in lists)
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
            if view is not None:
                merge_any, mergeable = view.opt_in(slot.task)
                out[-1].update(merge_any=int(merge_any), mergeable=int(mergeable))
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of per-page engine state (rmap columns, trees)."""
        rm = sum(s.rmap.nbytes + s.zero_vpns.nbytes + s.thp_zero.nbytes for s in self.mm.slots.values())
        return rm + self.stable.nbytes + self.unstable.nbytes

    # -- stores (run_store(), one_shot_scanning_store(), ...) after validation ---------

    def set_tunable(self, name: str, value: int) -> None:
        changed = getattr(self.tunables, name) != value
        setattr(self.tunables, name, value)
        if name == "advisor_mode" and changed:  # advisor_mode_store()
            set_advisor_defaults(self.advisor, self.tunables)

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

    # -- hooks from the rest of the system ------------------------------------------------

    def hint(self, task: TaskId, frozen: bool) -> None:
        """lksm_hint(): the freezer told us a task froze or thawed."""
        self.crawler.hint(task, frozen)
        self.publish()

    def task_exit(self, task: TaskId) -> None:
        """ksm_exit() for an mm we learnt has gone (the task exited, a zombie included,
        or exec'd): lksm_remove_candidate() for a task on the frozen task list,
        __ksm_exit() for a registered one - if that is still the mm `task` names (after
        an exec, the task's new mm may have joined since)."""
        self.crawler.forget(task)
        slot = self.mm.get(task)
        if slot is not None and slot.task.same_image(task):
            self.ksm_exit(slot)
        self.publish()

    def madvise(self, task: TaskId) -> bool:
        """ksm_madvise(MADV_MERGEABLE) by a task whose mm is not registered: under LKSM,
        __ksm_enter(mm, KSM_TASK_UNFROZEN) registers it at once - a listed newcomer queued
        at the scan list's tail, `ksm_nr_added_process++` - with no short-task test
        (check_short_task() is only in the prepare functions' for_each_process loops).
        The next scan that runs scans it.  False when it is registered or gone."""
        if not isinstance(self.crawler, LksmCrawler):
            return False  # mainline ksmd registers the madvised at its next pass
        if self.mm.get(task) is not None or task.pid == self.self_pid:
            return False
        if not self.crawler.madvise(task):
            return False
        self.publish()
        return True

    # -- the two threads --------------------------------------------------------------

    def crawl(self, now: float) -> float | None:
        """One pass of the policy's thread (ksm_crawld) at monotonic time `now`; returns
        when it wants to run next, or None to sleep until woken."""
        return self.crawler.crawl(now)

    def scanner_should_run(self) -> bool:
        # the policy may hold a handed-over scan (mainline: run=0 stops ksmd mid-pass)
        return self.scanner.should_run() and self.crawler.scanner_may_run()

    def scan_batch(self, npages: int | None = None) -> None:
        """One batch of the scanner thread (ksm_do_scan(pages_to_scan))."""
        self.scanner.batch(npages)

    def prepare_full_scan(self, now: float | None = None) -> int:
        return self.crawler.prepare_full_scan(now)

    def prepare_partial_scan(self) -> int:
        return self.crawler.prepare_partial_scan()

    # -- slots leaving --------------------------------------------------------------------

    def ksm_exit(self, slot: MmSlot) -> None:
        """__ksm_exit(): scanning_process drops at once (`ksm_nr_added_process--`, for the
        slot under the scanner's cursor too); a slot with rmap items is freed only when
        the current scan ends (lksm_remove_mm_slot -> remove_mm_list, freed by
        lksm_flush_removed_mm_list), so the page counters move then.  The cursor's slot
        is left to the scanner, which meets the exit at its next step."""
        if slot.exited or slot.removed:
            return  # one exit per mm
        slot.exited = True
        self.stats.nr_added_process -= 1
        self.stats.tasks_exited += 1
        self.crawler.forget(slot.task)
        if slot is self.scanner.cur:
            return
        if not len(slot.rmap) and not slot.zero_vpns.size:
            self.mm.unlink(slot)
            self._free_slot(slot)
        else:
            self.mm.remove(slot)

    def _free_slot(self, slot: MmSlot) -> None:
        """The per-slot part of lksm_flush_removed_mm_list()."""
        self.merger.remove_items(slot.rmap)
        slot.rmap = Rmap()
        self.stats.ksm_zero_pages -= int(slot.zero_vpns.shape[0])
        slot.zero_vpns = slot.zero_vpns[:0]
        for rid in slot.regions:
            self.regions.unref(rid)
        slot.regions.clear()
        try:
            self.source.release(slot.task)
        except Exception:  # noqa: BLE001 - a source failing to forget must not stop the engine
            log.exception("release(%s) failed", slot.task)

    def flush_removed_mm_list(self) -> None:
        """lksm_flush_removed_mm_list(): free the slots that left during the scan."""
        for slot in self.mm.take_removed():
            self._free_slot(slot)

    # -- run = 2 --------------------------------------------------------------------------

    def _unmerge_and_remove_all_rmap_items(self) -> None:
        """unmerge_and_remove_all_rmap_items(): every merge undone and every rmap item
        freed; slots stay registered, queued and in their states.

        The seed leaves ksm_scan.mm_slot on ksm_mm_head, which LKSM's scanner then takes
        for a slot (an oops).  Here the scan in progress is cancelled: its slot goes back
        to the head of the queue, a pending one-shot request is dropped (it reads 0), and
        the queue, the frozen task list and every slot state are kept, so the next
        request (or periodic pass) scans what was waiting, and completes."""
        cur = self.scanner.cancel()
        if cur is not None and not cur.removed:
            self.mm.scan_list.add_head(cur)
        for slot in list(self.mm.slots.values()):
            slot.rmap = Rmap()
            slot.zero_vpns = slot.zero_vpns[:0]
        self.flush_removed_mm_list()
        self.stable.clear()
        self.unstable = UnstableTree()
        st = self.stats
        st.pages_unshared = st.rmap_items = st.ksm_zero_pages = 0
        st.end_slot()
        st.end_scan()
        self.scanner.scan_round = 0
        self.tunables.one_shot_scanning = LKSM_SCAN_NONE
        self.crawler.unmerged()
        self.publish()

    # -- synchronous use ----------------------------------------------------------------------

    def full_scan(self) -> Record:
        """Prepare and run one full scan to its end (tests, `lksmfs scan`)."""
        return self._run_sync(self.crawler.prepare_full_scan())

    def partial_scan(self) -> Record:
        """Prepare and run one partial scan to its end."""
        return self._run_sync(self.crawler.prepare_partial_scan())

    def _run_sync(self, nr_target: int) -> Record:
        scanner = self.scanner
        scanner.sync = True
        try:
            if nr_target > 0:
                scanner.wake()
                while scanner.scan_state:
                    scanner.batch(1 << 30)
            else:
                if self.tunables.run & KSM_RUN_ONESHOT:
                    self.tunables.one_shot_scanning = LKSM_SCAN_NONE
                self.last_scan = scan_record(scanner.scan_mode)
                scanner.scan_mode = LKSM_SCAN_NONE
        finally:
            scanner.sync = False
        self.publish()
        return dict(self.last_scan)
