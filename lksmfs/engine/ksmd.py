"""ksmd as mainline Linux runs it: the `ksm` scheduling policy, beside LKSM's crawler.

Mainline mm/ksm.c (6.x, torvalds/linux) has no crawler and no one-shot requests: one
thread, ksmd, scans `pages_to_scan` pages, sleeps `sleep_millisecs`, and does it again
for as long as `run` has the merge bit, round robin over every registered mm:

- an mm is registered (__ksm_enter) when its process calls madvise(MADV_MERGEABLE) on
  a range or prctl(PR_SET_MEMORY_MERGE) on itself; ksmd scans only the VMAs that carry
  VM_MERGEABLE (`mg` in /proc/PID/smaps VmFlags; the prctl sets it on every compatible
  VMA).  `MainlineView` narrows the engine's source to exactly that.  User space cannot
  see __ksm_enter happen: registrations and exits are picked up when a pass begins.
- a full scan is one pass of the cursor over the mm list (scan_get_next_rmap_item):
  the unstable tree is reset when the cursor leaves the list head, full_scans
  (ksm_scan.seqnr) counts the wraps, and the batch that wraps ends there
  (ksm_do_scan() returns on a NULL rmap_item), so the next pass starts one
  sleep_millisecs later.  There are no partial scans.
- cmp_and_merge_page() gates every page on its checksum in every pass, before it even
  looks at the stable tree (LKSM looks at the stable tree first and drops the gate
  after its initial rounds).
- smart_scan (6.7+, on by default): should_skip_rmap_item() lets a page that failed to
  merge for a while be skipped for 1, 2, 4, then 8 passes running, by its rmap_item's
  age; a skipped page is visited but not scanned: it costs no budget, counts in
  pages_skipped, not pages_scanned, and leaves the unstable tree.
- run=2 frees every rmap_item and puts ksm_scan.seqnr (full_scans) back to 0.
- the KSM advisor (6.7+, advisor_mode scan-time; lksmfs.engine.advisor) times each
  pass from the cursor leaving the list head to its wrap, and retunes pages_to_scan
  at the wrap.

The engine's scanner and merger are shared with LKSM; this object answers the questions
they ask (lksmfs.engine.context.ScanPolicy) the way mainline does.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np

from lksmfs.engine.advisor import advisor_start_scan, advisor_stop_scan
from lksmfs.engine.context import KsmdCtx
from lksmfs.engine.crawler import SKIP_DENIED
from lksmfs.engine.merge import SourceError
from lksmfs.engine.params import KSM_RUN_MERGE, KSM_RUN_UNMERGE, LKSM_SCAN_FULL
from lksmfs.engine.rmap import Rmap, checksum_changed
from lksmfs.engine.slot import MmSlot
from lksmfs.engine.stats import Skipped
from lksmfs.sources.base import AccessDenied, Mapping, SourceWrapper, TaskId

# ksmd sleeps until __ksm_enter() wakes it when no mm is registered; we look again this often
IDLE_REGISTER_S = 1.0
AGE_MAX = 255  # U8_MAX: rmap_age_t saturates
SKIP_NOT_MERGEABLE = "not_mergeable"  # Ksm.skipped: in scope, but asked for no KSM
SMART_SCAN_MIN_AGE = 3  # should_skip_rmap_item(): younger items are never skipped


# -- smart_scan -----------------------------------------------------------------------


def skip_age(age: np.ndarray) -> np.ndarray:
    """skip_age(): passes a page may be skipped once its age says it keeps failing."""
    skips: np.ndarray = np.select([age <= 3, age <= 5, age <= 8], [1, 2, 4], 8).astype(np.uint8)
    return skips


def should_skip(part: Rmap, idx: np.ndarray) -> np.ndarray:
    """should_skip_rmap_item() for items `idx` of `part` (none of them a KSM page):
    every visit ages an item (saturating); an item younger than 3 is scanned; an older
    one with no skips left is scanned and gets skip_age(age) skips; otherwise it is
    skipped and uses one.  Updates age and skips in place; returns the skip mask."""
    age = part.age[idx]
    part.age[idx] = np.where(age != AGE_MAX, age + 1, age).astype(np.uint8)
    left = part.skips[idx]
    old = age >= SMART_SCAN_MIN_AGE
    reset = old & (left == 0)
    skip: np.ndarray = old & (left != 0)
    part.skips[idx[reset]] = skip_age(age[reset])
    part.skips[idx[skip]] = left[skip] - 1
    return skip


# -- what mainline ksmd may scan ----------------------------------------------------------


@runtime_checkable
class KsmRegistry(Protocol):
    """A source that can tell cheaply whether a task's mm is registered with KSM
    (procfs: /proc/PID/ksm_stat), without reading every mapping."""

    def ksm_registered(self, task: TaskId) -> bool: ...


@runtime_checkable
class KsmOptIn(Protocol):
    """A source that can say how a task opted in to KSM, as /proc/PID/ksm_stat's
    `ksm_merge_any` (prctl(PR_SET_MEMORY_MERGE)) and `ksm_mergeable` (a VM_MERGEABLE
    mapping: ksm_process_mergeable()) lines do."""

    def ksm_opt_in(self, task: TaskId) -> tuple[bool, bool]: ...


class MainlineView(SourceWrapper):
    """The engine's source as mainline ksmd sees it: only tasks with a VM_MERGEABLE
    mapping (a registered mm), and in them only the VM_MERGEABLE mappings count as
    mergeable.  Everything else is the wrapped source's (`inner`)."""

    def registered(self, task: TaskId) -> bool:
        """Did the task madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE)?"""
        if isinstance(self.inner, KsmRegistry):
            return self.inner.ksm_registered(task)
        try:
            return any(m.vm_mergeable for m in self.inner.mappings(task))
        except SourceError:
            return False

    def tasks(self) -> list[TaskId]:
        return [t for t in self.inner.tasks() if self.registered(t)]

    def opt_in(self, task: TaskId) -> tuple[bool, bool]:
        """(ksm_merge_any, ksm_mergeable) of the task; a source that cannot tell
        merge_any says no (the mappings tell mergeable)."""
        try:
            if isinstance(self.inner, KsmOptIn):
                return self.inner.ksm_opt_in(task)
            return False, any(m.vm_mergeable for m in self.inner.mappings(task))
        except SourceError:
            return False, False

    def mappings(self, task: TaskId) -> list[Mapping]:
        return [m if m.vm_mergeable or not m.mergeable else dataclasses.replace(m, mergeable=False)
                for m in self.inner.mappings(task)]


# -- the policy -------------------------------------------------------------------------------


class KsmdPolicy:
    """ksm_scan_thread() and the parts of scan_get_next_rmap_item(), cmp_and_merge_page()
    and the sysfs stores that differ from LKSM."""

    def __init__(self, ksm: KsmdCtx) -> None:
        self.k = ksm
        if not isinstance(ksm.source, MainlineView):
            ksm.source = MainlineView(ksm.source)
        self.crawl_round = 0  # passes prepared: each one starts a new unstable tree
        self._next_pass = 0.0  # ksmd sleeps sleep_millisecs after the batch that wrapped

    # -- the thread ---------------------------------------------------------------------

    def crawl(self, now: float) -> float | None:
        """ksm_scan_thread() between two passes: while run has the merge bit, the next
        pass begins sleep_millisecs after the batch that ended the last one."""
        k = self.k
        if not k.tunables.run & KSM_RUN_MERGE or k.scanner.scan_state:
            return None  # ksmd waits for run=1, or the pass in progress is still going
        if now < self._next_pass:
            return self._next_pass
        if self.prepare_full_scan(now) > 0:
            k.scanner.wake()
            return None
        self._next_pass = now + IDLE_REGISTER_S
        return self._next_pass

    def prepare_full_scan(self, now: float | None = None) -> int:
        """The cursor at ksm_mm_head: registrations and exits since the last pass take
        effect, and every registered mm is queued in list order (a new mm goes in just
        behind the cursor: the list's tail).  Returns the number queued."""
        k = self.k
        if k.tunables.run & KSM_RUN_UNMERGE:
            return 0
        self._register()
        for slot in k.mm.slots.values():
            k.mm.scan_list.add_tail(slot)
        k.scanner.scan_mode = LKSM_SCAN_FULL
        self.crawl_round += 1
        k.publish()
        return k.scanner.queued()

    def prepare_partial_scan(self) -> int:
        """Mainline has no partial scans."""
        return 0

    def _register(self) -> None:
        """__ksm_enter() for tasks that opted in since the last pass, __ksm_exit() for
        registered ones that are gone (or no longer have a VM_MERGEABLE mapping: ksmd
        frees such a slot when its scan finds none)."""
        k = self.k
        k.skipped.clear()  # what this pass leaves out replaces the last one's
        view = k.source
        assert isinstance(view, MainlineView)
        everyone = [t for t in view.inner.tasks() if t.pid != k.self_pid and t.pid != 0]
        tasks = [t for t in everyone if view.registered(t)]
        for task in everyone:
            if task not in tasks:
                k.skipped[task] = Skipped("", SKIP_NOT_MERGEABLE)
        alive = set(tasks)
        for task in [t for t in k.mm.slots if t not in alive]:
            k.task_exit(task)
        for task in tasks:
            if k.mm.get(task) is not None:
                continue
            try:
                st = k.source.stat(task)
            except AccessDenied:
                k.skipped[task] = Skipped("", SKIP_DENIED)
                continue
            except SourceError as e:
                k.stats.failed(e)
                continue
            if st.kthread:
                continue
            k.mm.alloc(task, st.comm, st.faults, st.anon_pages, frozen=False, queue=False)
            k.stats.nr_added_process += 1

    # -- hooks from the rest of the system ------------------------------------------------

    def hint(self, task: TaskId, frozen: bool) -> None:
        """Mainline has no freezer hook."""

    def forget(self, task: TaskId) -> None:
        """__ksm_exit(): an exited mm's slot moves right behind the cursor and ksmd frees
        its rmap_items on its next step; here they go at once (the slot under the
        cursor is left to the scanner, which meets the exit itself)."""
        k = self.k
        slot = k.mm.get(task)
        if slot is None or slot is k.scanner.cur:
            return
        k.merger.remove_items(slot.rmap)
        slot.rmap = Rmap()
        k.stats.ksm_zero_pages -= int(slot.zero_vpns.shape[0])
        slot.zero_vpns = slot.zero_vpns[:0]

    def unmerged(self) -> None:
        """unmerge_and_remove_all_rmap_items(): ksm_scan.seqnr = 0 (full_scans reads 0)
        and the cursor is back at the list head, so the next pass starts afresh."""
        k = self.k
        k.stats.nr_full_scan = 0
        k.mm.scan_list.clear()
        self.crawl_round = 0
        self._next_pass = 0.0

    # -- the policy's answers to the scanner ------------------------------------------------

    def checksum_gate(self, scan_round: int) -> bool:
        """Mainline checks the checksum in every pass."""
        return True

    def filtering_allowed(self, slot: MmSlot) -> bool:
        """LKSM_FILTER is LKSM's."""
        return False

    def scan_starting(self, mode: int) -> None:
        """scan_get_next_rmap_item() at ksm_mm_head: advisor_start_scan() (not when a
        pass stopped by run=0 goes on: its cursor is not at the head)."""
        k = self.k
        if k.scanner.at_head:
            advisor_start_scan(k.advisor, k.tunables, k.clock())

    def scan_wrapped(self, mode: int) -> None:
        """The batch that wrapped ended the pass: advisor_stop_scan() retunes
        pages_to_scan, and the next pass starts a sleep later.  A pass stopped by run=0
        (cursor and queue kept) has not wrapped."""
        k = self.k
        if not k.scanner.queued():
            advisor_stop_scan(k.advisor, k.tunables, k.clock(), k.scan_cpu_ns())
        self.set_next_pass(k.clock() + k.tunables.sleep_millisecs / 1000)

    def set_next_pass(self, when: float) -> None:
        """When ksmd starts its next pass (lksmfs.engine.fastpass runs passes itself)."""
        self._next_pass = when

    def scanner_may_run(self) -> bool:
        """ksmd_should_run(): only while run has the merge bit (run=0 stops the cursor
        where it is; the pass goes on once run is 1 again)."""
        return bool(self.k.tunables.run & KSM_RUN_MERGE)

    def visit(self, part: Rmap, hi: np.ndarray, ksm_page: np.ndarray) -> tuple[np.ndarray, int]:
        """should_skip_rmap_item() and the head of cmp_and_merge_page() for the pages of
        a chunk that are not unchanged KSM pages: smart_scan may skip them; the others
        leave their tree and must show the checksum of their last visit (a changed one
        is stored, and the page waits for the next pass).  Returns the pages left for
        the stable and unstable trees, and the number skipped."""
        k = self.k
        other = np.flatnonzero(~ksm_page)
        skipped = 0
        if k.tunables.smart_scan and other.size:
            skip = should_skip(part, other)
            if skip.any():
                gone = other[skip]
                k.merger.remove_from_tree(part, gone)
                skipped = int(gone.shape[0])
                k.stats.pages_skipped += skipped
                other = other[~skip]
        if other.size:
            changed, ck = checksum_changed(part, other, hi[other])
            if changed.any():
                moved = other[changed]
                k.merger.remove_from_tree(part, moved)
                part.cksum[moved] = ck[changed]
                other = other[~changed]
        return other, skipped

