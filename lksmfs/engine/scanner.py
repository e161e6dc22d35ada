"""ksmd: the scanner and its cursor (mm/ksm.c's struct ksm_scan).

The scanner walks the scan list the policy prepared, slot by slot, VMA by VMA, and
hands each chunk of present anonymous pages to the merger.  Its cursor is this object:
the slot being scanned (`cur`) with its place inside the slot (a generator's frame),
the batch budget, the current region, the round, and the scan's start.  Nothing here
sleeps: `batch()` does one ksm_do_scan(pages_to_scan) and returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator

import numpy as np

import lksmfs.engine.thp as thp
from lksmfs.engine.context import ScannerCtx
from lksmfs.engine.hashindex import normkey
from lksmfs.engine.merge import SourceError
from lksmfs.engine.numa import fold_nodes, node_source
from lksmfs.engine.pages import CHUNK, READ_BLOCK, Chunk, as_words
from lksmfs.engine.params import (
    KSM_MM_FROZEN,
    KSM_MM_NEWCOMER,
    KSM_MM_SCANNED,
    KSM_RUN_MERGE,
    LKSM_SCAN_FULL,
    LKSM_SCAN_NONE,
    POLICY_KSM,
)
from lksmfs.engine.regions import HEAP_REGION, UNKNOWN_REGION
from lksmfs.engine.rmap import FROZEN, GONE, NOT_FROZEN, STABLE, UNSTABLE, Rmap
from lksmfs.engine.slot import MmSlot
from lksmfs.engine.stats import Record, scan_record
from lksmfs.engine.unstable import UnstableTree
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskFailed, TaskId, describe_error

log = logging.getLogger(__name__)

VmaRun = tuple[int, np.ndarray, Callable[[], None] | None]
Read = tuple[memoryview | None, np.ndarray, np.ndarray]  # pages (None: not read), digests lo, hi


def filter_may_start() -> None:
    """The event of a run whose region's filter may get its first bit on the way: the
    run is scanned while watching for it (Scanner._scan_slot)."""


class Scanner:
    """ksmd with its cursor, over the engine's state."""

    def __init__(self, ksm: ScannerCtx) -> None:
        self.k = ksm
        self.scan_state = False  # ksm_state: a scan has been handed over
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_round = 0
        self.sync = False  # driven by full_scan()/partial_scan(): run's merge bit not needed
        # hook for lksmfs.engine.fastpass: a batch ends where a slot ends, so the fast path
        # can take the next slot itself (never set by the daemon or the policies)
        self.one_slot = False
        # the cursor
        self.cur: MmSlot | None = None
        self.gen: Generator[int, None, None] | None = None
        self._budget = 0
        self._at_head = True  # ksm_scan.mm_slot == &ksm_scan_head: between two passes
        self.region = -1  # ksm_scan.region: the region used last in this mm (-1: NULL)
        self._cur_new: Rmap | None = None  # the new rmap list of the slot being scanned
        self._cur_valid = 0
        # the old list's position after the chunk being settled, once its items are in the
        # new list (None between chunks): where a task that dies mid-chunk leaves its items
        self._chunk_end: int | None = None
        self._cur_pos = 0  # the old rmap list's first item the scan has not passed yet
        self._new_zero: list[np.ndarray] = []  # pages of that slot merged with the zero page now
        self._matched = np.zeros(0, dtype=bool)
        # the scan in progress
        self._started = False
        self._begin = 0.0
        self._pages_at_begin = 0
        self._failed_at_begin = 0
        self._unstable_hint = 0  # entries the last round's unstable tree ended with
        self._buf = bytearray()  # the page contents of the chunk being scanned
        self._last_prune = ksm.clock()

    # -- what the cursor says (read by lksmfs.engine.fastpass) ------------------------

    @property
    def started(self) -> bool:
        """The scan handed over has had its first batch (scan_starting() was told)."""
        return self._started

    @property
    def at_head(self) -> bool:
        """ksm_scan.mm_slot == &ksm_scan_head: between two passes (the next slot starts
        a new round's unstable tree)."""
        return self._at_head

    @property
    def last_prune(self) -> float:
        """When stable_node_chains were last pruned (the engine's clock)."""
        return self._last_prune

    def between_passes(self, scan_round: int, unstable_hint: int, last_prune: float, record: Record) -> None:
        """The cursor back at the list head after whole passes run elsewhere
        (lksmfs.engine.fastpass): the round they ended, the entries their last unstable
        tree had, the last chain prune, and their last scan's record."""
        k = self.k
        self.gen = None
        self.cur = None
        k.mm.scan_list.clear()
        self.scan_round = scan_round
        self._unstable_hint = unstable_hint
        self._last_prune = last_prune
        k.unstable = UnstableTree()
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_state = False
        self._started = False
        self._at_head = True
        k.last_scan = record

    # -- the thread's view -------------------------------------------------------------

    def should_run(self) -> bool:
        """Does the scanner thread have work: a scan has been handed over (ksm_state).

        Whatever else happened since, the scanner then always reaches the end of the
        scan: it scans while merging is on and something is queued, and otherwise wraps
        the scan up (lksm_scan_thread's two lksm_scan_wrapup_wait() paths), so an
        accepted request can never be left pending by exits, hints or run changes."""
        return self.scan_state

    def wake(self) -> None:
        """lksm_wake_up_scan_thread()."""
        self.scan_state = True
        self._started = False

    def queued(self) -> int:
        """Slots still to visit in this pass (the one under the cursor included)."""
        return len(self.k.mm.scan_list) + (self.gen is not None)

    def batch(self, npages: int | None = None) -> None:
        """ksm_do_scan(pages_to_scan), then the end-of-scan work when the list is empty,
        or the wrap-up of an interrupted scan when merging was turned off."""
        k = self.k
        t = k.tunables
        if not self.scan_state:
            return
        if not (t.run & KSM_RUN_MERGE or self.sync):
            # run=0 in the middle of a scan: !ksmd_should_run() -> the scan is wrapped
            # up and counted; the cursor and the queue stay, so the scan goes on from
            # where it was once merging is back and the crawler prepares again
            self._finish(interrupted=True)
            k.publish()
            return
        if not self._started:
            self._started = True
            self._begin = time.perf_counter()
            self._pages_at_begin = k.stats.pages_scanned
            self._failed_at_begin = k.stats.tasks_failed
            k.crawler.scan_starting(self.scan_mode)
        self._do_scan(npages if npages is not None else t.pages_to_scan)
        if self.gen is None and not len(k.mm.scan_list):
            self._finish()
        k.publish()

    def _do_scan(self, budget: int) -> None:
        scanned = 0
        while scanned < budget:
            if self.gen is None:
                slot = self.next_slot()
                if slot is None:
                    return
                self.gen = self._scan_slot(slot)
            self._budget = budget - scanned
            try:
                scanned += next(self.gen)
            except StopIteration:
                self.gen = None
                self.cur = None
                if self.one_slot:  # hook: see __init__
                    return

    def next_slot(self) -> MmSlot | None:
        """scan_get_next_rmap_item(): at the list head a new round resets the unstable
        tree; then lksm_get_unscanned_mm_slot()."""
        k = self.k
        if not len(k.mm.scan_list):
            self._at_head = True
            return None
        if self._at_head and self.scan_round < k.crawler.crawl_round:
            self.scan_round = k.crawler.crawl_round
            # sized like the last round's tree (and a little more): no rehashing while
            # it fills again
            k.unstable = UnstableTree(self._unstable_hint + self._unstable_hint // 32)
            self._maybe_prune_chains()
        self._at_head = False
        slot = k.mm.scan_list.pop_first()
        if slot is None:
            return None
        k.stats.lksm_nr_scanned_slot += 1
        self.cur = slot
        return slot

    def _maybe_prune_chains(self) -> None:
        k = self.k
        now = k.clock()
        if (now - self._last_prune) * 1000 >= k.tunables.stable_node_chains_prune_millisecs:
            self._last_prune = now
            if k.policy != POLICY_KSM:  # mainline collapses chains at walks (_last_walk())
                k.stable.prune_chains(k.tunables.max_page_sharing)

    def _finish(self, interrupted: bool = False) -> None:
        """lksm_flush_removed_mm_list() + lksm_scan_wrapup_wait().  An `interrupted`
        scan (run lost its merge bit) keeps its cursor, queue and unstable tree."""
        k = self.k
        k.flush_removed_mm_list()
        stats = k.stats
        k.last_scan = scan_record(self.scan_mode, stats.lksm_nr_scanned_slot,
                                  stats.pages_scanned - self._pages_at_begin, stats.lksm_nr_merged,
                                  stats.lksm_nr_broken, time.perf_counter() - self._begin,
                                  stats.tasks_failed - self._failed_at_begin)
        # mainline counts a pass at its wrap only (ksm_scan.seqnr++): run=0 just stops ksmd
        if self.scan_mode == LKSM_SCAN_FULL and not (interrupted and k.policy == POLICY_KSM):
            stats.nr_full_scan += 1
        k.crawler.scan_wrapped(self.scan_mode)
        stats.end_scan()
        if not interrupted:
            self._at_head = True
            # nothing reads this round's unstable tree once the scan is over: give it back,
            # with the buffers pages were read into
            self._unstable_hint = len(k.unstable)
            k.unstable = UnstableTree()
            if k.crawler.checksum_gate(self.scan_round):
                # pages failed the gate this round and may wait in the tree the next one:
                # sized for them, it is not rehashed while it fills (the old and the new
                # table side by side: the peak of a round)
                self._unstable_hint = max(self._unstable_hint, self._distinct_unmerged())
            self._buf = bytearray()
            k.merger.release_buffers()
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_state = False
        self._started = False

    def _distinct_unmerged(self) -> int:
        """About how many distinct contents the items outside KSM pages hold, from the
        digests of their last visit (linear counting over a 2^20-entry sketch, 1 MiB):
        the most a round can put in the unstable tree.  0 where items keep no digest."""
        m = 1 << 20
        seen = np.zeros(m, dtype=bool)
        for slot in self.k.mm.slots.values():
            rm = slot.rmap
            if not len(rm):
                continue
            if not rm.tracks_digests:
                return 0
            free = (rm.flags & STABLE) == 0
            seen[(rm.dlo[free] & np.uint64(m - 1)).astype(np.intp)] = True
        zeros = m - int(np.count_nonzero(seen))
        return 4 * m if zeros == 0 else int(-m * math.log(zeros / m))

    def cancel(self) -> MmSlot | None:
        """Drop the scan in progress (run=2); returns the slot that was under the cursor."""
        cur = self.cur if self.gen is not None else None
        if self.gen is not None:
            self.gen.close()
        self.gen = None
        self.cur = None
        self._cur_new = None
        self._at_head = True
        self.scan_mode = LKSM_SCAN_NONE
        self.scan_state = False
        self._started = False
        return cur

    def _chunk_buffer(self, npages: int) -> memoryview:
        """The buffer pages are read into: the scanner's to size (READ_BLOCK pages, or the
        pages a comparison needs), given back when a scan ends."""
        need = npages * PAGE_SIZE
        if len(self._buf) < need:
            self._buf = bytearray(need)
        return memoryview(self._buf)[:need]

    def _read_digests(self, slot: MmSlot, run: np.ndarray) -> Read:
        """Read pages and digest them.  Up to READ_BLOCK pages are read at once and their
        bytes serve the chunk's comparisons; more are read a block at a time and only
        their digests kept: what a comparison needs is read again (Chunk.fetch), so a
        scan's buffers stay at READ_BLOCK pages whatever the chunk."""
        n = int(run.shape[0])
        task = slot.task
        if n <= READ_BLOCK:
            data = self.k.source.read_pages(task, run, self._chunk_buffer(n))
            lo, hi = self.k.digest.pages(data, n)
            return data, *self._node_keys(task, run, lo, hi)
        lo = np.empty(n, dtype=np.uint64)
        hi = np.empty(n, dtype=np.uint64)
        for b in range(0, n, READ_BLOCK):
            block = run[b : b + READ_BLOCK]
            m = int(block.shape[0])
            lo[b : b + m], hi[b : b + m] = self.k.digest.pages(
                self.k.source.read_pages(task, block, self._chunk_buffer(m)), m)
        return None, *self._node_keys(task, run, lo, hi)

    def _node_keys(self, task: TaskId, run: np.ndarray, lo: np.ndarray,
                   hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """merge_across_nodes 0: each page's node becomes part of its tree key, so pages
        of two nodes never meet in a tree (lksmfs.engine.numa)."""
        t = self.k.tunables
        src = None if t.merge_across_nodes else node_source(self.k.source)
        if src is None:
            return lo, hi
        return fold_nodes(lo, hi, src.page_nodes(task, run), self.k.digest if t.use_zero_pages else None)

    def _fetcher(self, slot: MmSlot, part: Rmap) -> Callable[[np.ndarray], np.ndarray]:
        """For a chunk that was not read: read just the pages a comparison needs."""

        def fetch(i: np.ndarray) -> np.ndarray:
            n = int(i.shape[0])
            data = self.k.source.read_pages(slot.task, part.vpn[i], self._chunk_buffer(n))
            return as_words(data).copy()

        return fetch

    def current_items(self) -> Rmap:
        """The items of the slot being scanned that are valid so far (this chunk included)."""
        return self._cur_new.view(0, self._cur_valid) if self._cur_new is not None else Rmap()

    def add_zero_pages(self, vpns: np.ndarray) -> None:
        """Pages of the slot being scanned were merged with the zero page."""
        self._new_zero.append(vpns)

    def items_of(self, slot: MmSlot) -> list[Rmap]:
        """The slot's rmap items now: its list - or, for the slot being scanned into a new
        list, the new list's items so far and the old list's the scan has not passed
        (get_next_rmap_item() frees the ones it passes, allocates as it goes)."""
        new = self._cur_new
        old = slot.rmap
        if slot is not self.cur or self.gen is None or new is None or new is old:
            return [old]
        return [new.view(0, self._cur_valid), old.view(self._cur_pos, len(old))]

    def zero_pages(self, slot: MmSlot) -> int:
        """The slot's pages merged with the zero page now (mm->ksm_zero_pages): those of
        its last scan, and for the slot being scanned those merged so far in this one."""
        n = int(slot.zero_vpns.shape[0])
        if slot is self.cur and self.gen is not None:
            n += sum(int(z.shape[0]) for z in self._new_zero)
        return n

    # -- one slot ------------------------------------------------------------------

    def _scan_slot(self, slot: MmSlot) -> Generator[int, None, None]:
        """Scan one mm_slot from its first VMA to its last, yielding pages scanned per
        chunk (the cursor's place in the slot lives in this generator's frame).

        The present anonymous pages of every VMA are listed first.  When they are the
        pages of the slot's rmap list, that list is updated where it is (the common case:
        nothing was mapped or unmapped); otherwise - or as soon as the scan visits other
        pages, because of the filter or the zero page - a new list is allocated once (an
        upper bound) and filled in place.  Each VMA's region, size checks and filter are
        decided when the scanner reaches it, as lksm_find_next_vma() does.
        """
        k = self.k
        begin = k.clock()
        old = slot.rmap
        pos = 0
        filled = 0
        new = Rmap()
        zero_kept: list[np.ndarray] = []
        # the pages merged with the zero page stay the slot's (its per-process figure)
        # until its scan ends, as the kernel's mm->ksm_zero_pages does on unchanged memory
        prev_zero = slot.zero_vpns
        prev_thp_zero, slot.thp_zero = slot.thp_zero, slot.thp_zero[:0]
        thp_zero_kept: list[np.ndarray] = []
        self._new_zero = []
        self._cur_pos = 0
        self.region = -1  # ksm_scan.region is NULL when a slot starts
        try:
            # Taken before anything is read: equal to the mark taken before the last
            # scan, it says the task ran nothing since, so its pages are those the last
            # scan read, with the digests that scan kept (the items' dlo/dhi).
            mark = k.source.cpu_mark(slot.task)
            quiet = mark is not None and mark == slot.cpu_mark and old.tracks_digests
            slot.cpu_mark = mark
            keep_digests = mark is not None
            maps = slot.merge_scope(k.source.mappings(slot.task))
            present: list[tuple[int, np.ndarray]] = []
            huge: list[np.ndarray] = []
            for i, vma in enumerate(maps):
                if vma.mergeable and vma.has_anon:
                    vpns = k.source.present_anon(slot.task, vma.start_vpn, vma.end_vpn)
                    if prev_zero.size:
                        vpns = self._zero_page_check(slot, prev_zero, vma.start_vpn, vma.end_vpn, vpns, zero_kept,
                                                     quiet)
                    if prev_thp_zero.size:
                        vpns = self._zero_page_check(slot, prev_thp_zero, vma.start_vpn, vma.end_vpn, vpns,
                                                     thp_zero_kept, quiet)
                    if vma.huge_pages:
                        huge.append(k.source.thp_blocks(slot.task, vma.start_vpn, vma.end_vpn))
                    present.append((i, vpns))
            if thp_zero_kept:
                slot.thp_zero = np.sort(np.concatenate(thp_zero_kept))
            self._thp_blocks_now(slot, huge)
            total = sum(int(v.shape[0]) for _, v in present)
            ages = k.policy == POLICY_KSM  # smart_scan's columns
            inplace = len(old) == total and (old.tracks_digests, old.tracks_ages) == (keep_digests, ages) and \
                self._same_pages(old, [v for _, v in present])
            new = old if inplace else Rmap(total, k.filter_enabled, keep_digests, ages)
            self._cur_new = new
            at = k.unstable.visit(slot, total)  # the tree's number of the list's item 0
            # The pages to scan next, from one or more VMAs: a chunk may span VMAs (a
            # process of many small mappings costs per chunk, not per VMA).  In the seed
            # every page is merged before the scanner walks on, so the pending pages are
            # scanned first whenever the next walk could tell the difference: when it
            # may conflict its region (whose type a merge's accounting reads) or consult
            # its filter (whose bits a merge sets - for the page's own region or its
            # unstable tree partner's, any region).  Otherwise walk and merges commute.
            segs: list[tuple[int, int, np.ndarray]] = []  # (region, VMA start, pages)
            seg_n = 0

            def read(run: np.ndarray) -> Read:
                """The next pages of the slot and their digests: those the last scan read,
                of a task that has not run since, are not read again."""
                if quiet and len(old):  # where the last scan's items are (the list may have moved)
                    at = np.minimum(np.searchsorted(old.vpn, run), len(old) - 1)
                    if bool((old.vpn[at] == run).all()):
                        return None, old.dlo[at], old.dhi[at].astype(np.uint64)
                return self._read_digests(slot, run)

            def scan_pending(pre: Read | None = None) -> Generator[int, None, None]:
                nonlocal segs, seg_n, new, inplace, filled, pos
                if not seg_n:
                    return
                n = seg_n
                if len(segs) == 1:
                    run = segs[0][2]
                    rids = np.full(n, segs[0][0], dtype=np.int32)
                    bases = np.full(n, segs[0][1], dtype=np.uint64)
                else:
                    lens = [int(sg[2].shape[0]) for sg in segs]
                    run = np.concatenate([sg[2] for sg in segs])
                    rids = np.repeat(np.array([sg[0] for sg in segs], dtype=np.int32), lens)
                    bases = np.repeat(np.array([sg[1] for sg in segs], dtype=np.uint64), lens)
                segs, seg_n = [], 0
                if slot.thp_zero.size:
                    # pages a split gave the zero page during this scan are not visited
                    keep = ~thp.vanished(slot, run)
                    if not keep.all():
                        run, rids, bases, pre = run[keep], rids[keep], bases[keep], None
                        n = int(run.shape[0])
                        if not n:
                            return
                if inplace and not np.array_equal(old.vpn[filled : filled + n], run):
                    # the scan leaves the old list's pages: from here on, a new list
                    new = Rmap(total, k.filter_enabled, keep_digests, ages)
                    new.fill_from(old, filled)
                    self._cur_new = new
                    inplace = False
                part = new.view(filled, filled + n)
                if not inplace:
                    part.vpn[:] = run
                data, lo, hi = pre if pre is not None else read(run)  # pre: scan_watching_filter's
                self._cur_valid = filled + n
                pos, scanned = self._scan_chunk(slot, bases, rids, part, data, lo, hi, old,
                                                filled if inplace else pos, at + filled, inplace)
                self._chunk_end = None
                self._cur_pos = pos
                filled += n
                k.publish()
                yield scanned  # hook: pages the policy skipped cost no budget

            def add(rid: int, base: int, run: np.ndarray) -> Generator[int, None, None]:
                """Pages to scan, scanned whenever a chunk is full."""
                nonlocal segs, seg_n
                j = 0
                while j < run.shape[0]:
                    take = min(self._chunk_limit() - seg_n, int(run.shape[0]) - j)
                    if take > 0:
                        segs.append((rid, base, run[j : j + take]))
                        seg_n += take
                        j += take
                    if seg_n >= self._chunk_limit():
                        yield from scan_pending()

            def scan_watching_filter(rid: int, vma: Mapping, run: np.ndarray) -> Generator[int, None, None]:
                """A mature region with no filter yet (lksm_region_skipped()): every page
                goes through __scan_next_rmap_item()'s filter until a merge sets the
                region's first bit, and from the next page on the filter applies - to
                the rest of this mapping too.  Only a page whose content has a KSM page
                (other than its own, unchanged) or an unstable tree item, or another
                page of the chunk, can merge: the pages between two such pages are
                scanned as one chunk, those pages one at a time, each followed by a look
                at the filter."""
                nonlocal segs, seg_n
                regions = k.regions
                j = 0
                while j < run.shape[0]:
                    if regions.use_filter(rid, self.scan_round):
                        yield from add(rid, vma.start_vpn, self._filtered(rid, vma, run[j:]))
                        return
                    piece = run[j : j + self._chunk_limit()]
                    data, lo, hi = read(piece)
                    may = k.merger.may_merge(lo, hi)
                    m = int(piece.shape[0])
                    if inplace and np.array_equal(old.vpn[filled : filled + m], piece):
                        # an unchanged KSM page is left as it is (cmp_and_merge_page()
                        # returns at once): it sets no bit
                        may &= ~k.stable.unchanged(old.flags[filled : filled + m], old.node[filled : filled + m],
                                                   lo, hi)
                    cand = np.flatnonzero(may)
                    # `data` (the read buffer) stays valid below: with the pages given,
                    # nothing reads into it until the piece is done (Chunk.fetch is unused)
                    s = 0
                    for f in [*cand.tolist(), int(piece.shape[0])]:
                        for a, b in ((s, f), (f, f + 1)):
                            b = min(b, int(piece.shape[0]))
                            if a >= b:
                                continue
                            segs, seg_n = [(rid, vma.start_vpn, piece[a:b])], b - a
                            d = None if data is None else data[a * PAGE_SIZE : b * PAGE_SIZE]
                            yield from scan_pending((d, lo[a:b], hi[a:b]))
                        s = f + 1
                        if f < piece.shape[0] and regions.use_filter(rid, self.scan_round):
                            yield from add(rid, vma.start_vpn, self._filtered(rid, vma, run[j + s :]))
                            return
                    j += int(piece.shape[0])

            for i, vpns in present:
                vma = maps[i]
                vma_rid = self._vma_region(maps, i)
                if seg_n and not self._walk_commutes(slot, maps[i], vma_rid):
                    yield from scan_pending()
                for rid, run, event in self._walk_vma(slot, maps, i, vpns, vma_rid):
                    if event is filter_may_start:
                        yield from scan_pending()
                        yield from scan_watching_filter(rid, vma, run)
                        continue
                    if event is not None:
                        yield from scan_pending()
                        event()
                    yield from add(rid, vma.start_vpn, run)
            yield from scan_pending()
            if inplace:
                pos = filled
        except Exception as e:  # noqa: BLE001 - one task's failure must not stop the scanner
            if not isinstance(e, SourceError):
                log.warning("%s: dropping the task after an unexpected error while scanning it: %s",
                            slot.task, describe_error(e))
                log.debug("%s: the error", slot.task, exc_info=e)
                e = TaskFailed(f"{slot.task}: {describe_error(e)}")
            # the items so far, and the old list's not reached yet; a chunk that was being
            # settled (its pages re-read for a comparison) has its items in the new list
            # already, and the old list's before its end are in there or freed
            valid, rest = (filled, pos) if self._chunk_end is None else (self._cur_valid, self._chunk_end)
            k.merger.remove_items(new.view(0, valid))
            k.merger.remove_items(old.take(slice(rest, None)))
            slot.rmap = Rmap()
            k.stats.ksm_zero_pages -= int(prev_zero.shape[0]) + sum(int(z.shape[0]) for z in self._new_zero)
            slot.zero_vpns = prev_zero[:0]
            self._new_zero = []
            self._slot_gone(slot, e)
            return
        finally:
            self._cur_new = None
            self._cur_valid = 0
            self._chunk_end = None
        # remove_trailing_rmap_items()
        k.merger.remove_items(old.take(slice(pos, None)))
        slot.rmap = new if filled == len(new) else new.copy(filled)
        kept = np.concatenate(zero_kept) if zero_kept else prev_zero[:0]
        k.stats.ksm_zero_pages -= int(prev_zero.shape[0] - kept.shape[0])
        slot.zero_vpns = np.sort(np.concatenate([kept, *self._new_zero])) if self._new_zero else kept
        self._new_zero = []
        self.slot_done(slot, k.clock() - begin)

    @staticmethod
    def _thp_blocks_now(slot: MmSlot, huge: list[np.ndarray]) -> None:
        """The slot's THPs as the source maps them now, less those a merge split (which
        the kernel would have split: shadow mode splits nothing)."""
        blocks = np.unique(np.concatenate(huge)) if huge else np.zeros(0, dtype=np.int64)
        slot.split_blocks &= set(blocks.tolist())
        if slot.split_blocks:
            blocks = blocks[~np.isin(blocks, np.fromiter(slot.split_blocks, dtype=np.int64))]
        slot.thp_blocks = blocks

    @staticmethod
    def _same_pages(old: Rmap, present: list[np.ndarray]) -> bool:
        """Are the present pages, VMA after VMA, those of the old list (compared a VMA at
        a time: no copy of a whole process's page list)?"""
        at = 0
        for vpns in present:
            n = int(vpns.shape[0])
            if not np.array_equal(old.vpn[at : at + n], vpns):
                return False
            at += n
        return at == len(old)

    def _vma_region(self, maps: list[Mapping], i: int) -> int:
        """The lksm_find_region() half of lksm_find_next_vma() for maps[i]: its region, or
        HEAP_REGION, or UNKNOWN_REGION (NULL or conflicted).  Reads nothing merges change."""
        k = self.k
        if not k.filter_enabled:
            return UNKNOWN_REGION
        rid = k.regions.find(maps, i, self.region, k.crawler.crawl_round)
        if rid != HEAP_REGION and not k.regions.is_file(rid):
            rid = UNKNOWN_REGION  # NULL or conflicted: the unknown region
        return rid

    def _walk_commutes(self, slot: MmSlot, vma: Mapping, rid: int) -> bool:
        """Does _walk_vma() for `vma` in region `rid` give the same, and leave the regions
        the same, whether pages before it are merged first or after?  Merges change a
        region's filter bits and counts, never its type or size; a walk reads the bits
        only where the filter may apply, and changes a type only on a size mismatch."""
        k = self.k
        if not k.filter_enabled or not k.regions.is_file(rid):
            return True
        if k.regions.size_mismatch(rid, vma.npages):
            return False
        return not (k.crawler.filtering_allowed(slot) and k.regions.get(rid).mature(self.scan_round))

    def _walk_vma(self, slot: MmSlot, maps: list[Mapping], i: int, vpns: np.ndarray, rid: int) -> list[VmaRun]:
        """The rest of lksm_find_next_vma() and the filter of __scan_next_rmap_item() for
        maps[i] in region `rid` (from _vma_region()): the present pages the scanner
        visits, as runs of (region, pages, what happens to the region first).

        The seed runs the region size check once per call, that is once before each
        page it returns and once more when the VMA is exhausted.  A larger mapping
        resizes the region at the first check and agrees with it afterwards; a smaller
        one is never resized, so its second check - right after its first visited page -
        is the region's second conflict: that page still belongs to the (now conflicted)
        region, every later one to the unknown region, unfiltered.  `region` follows
        ksm_scan.region, which lksm_find_region() consults for the next VMA.
        """
        k = self.k
        if not k.filter_enabled:
            return [(UNKNOWN_REGION, vpns, None)]
        regions = k.regions
        vma = maps[i]
        prior = self.region
        if not regions.is_file(rid):
            self.region = rid
            return [(rid, vpns, None)]
        if not regions.size_check(rid, vma.npages):
            # conflicted at the first check; the seed then keeps the stale
            # ksm_scan.region for this page (the previous VMA's region, or NULL): the
            # unknown region, as its comment intends
            self.region = UNKNOWN_REGION if vpns.size else prior
            return [(UNKNOWN_REGION, vpns, None)]
        sel = vpns
        self.region = rid
        if k.crawler.filtering_allowed(slot):
            if regions.use_filter(rid, self.scan_round):
                sel = self._filtered(rid, vma, vpns)
            elif regions.get(rid).mature(self.scan_round) and not regions.size_mismatch(rid, vma.npages):
                # no filter yet: until a merge in this mapping gives the region one
                return [(rid, vpns, filter_may_start)]
        if not regions.size_mismatch(rid, vma.npages) or not sel.size:
            return [(rid, sel, None)]
        # a smaller mapping: the check after its first visited page conflicts the region
        first = sel[:1]
        rest = vpns[vpns > first[0]]
        self.region = UNKNOWN_REGION if rest.size > 1 else rid
        return [
            (rid, first, None),
            (rid, rest[:1], lambda: self._conflict(rid, vma.npages)),
            (UNKNOWN_REGION, rest[1:], None),
        ]

    def _filtered(self, rid: int, vma: Mapping, vpns: np.ndarray) -> np.ndarray:
        """The pages of `vma` a region's filter lets through: those at offsets whose bit
        is set (lksm_get_next_filtered_address()); an emptied filter skips them all."""
        region = self.k.regions.get(rid)
        if region.filter_cnt == 0:
            return vpns[:0]
        offs = (vpns - np.uint64(vma.start_vpn)).astype(np.int64)
        sel: np.ndarray = vpns[region.filtered_offsets(offs)]
        return sel

    def _chunk_limit(self) -> int:
        """Pages a chunk may hold now: CHUNK, or less when the budget is smaller."""
        return max(1, min(CHUNK, self._budget))

    def _conflict(self, rid: int, npages: int) -> None:
        conflicted = not self.k.regions.size_check(rid, npages)
        assert conflicted, "a smaller mapping's second size check conflicts its region"

    def _zero_page_check(
        self, slot: MmSlot, zero: np.ndarray, start: int, end: int, vpns: np.ndarray, kept: list[np.ndarray],
        quiet: bool = False,
    ) -> np.ndarray:
        """Pages merged with the zero page are the zero page while they stay zero (not
        anonymous: follow_page() skips them); a write brings them back as anon pages.
        A task that has not run (`quiet`) has written none of them."""
        z = zero[(zero >= np.uint64(start)) & (zero < np.uint64(end))]
        z = z[np.isin(z, vpns)]
        if not z.size:
            return vpns
        if quiet:
            zs = z
        else:
            _, lo, hi = self._read_digests(slot, z)  # a block at a time: bounded buffers
            zs = z[self.k.digest.is_zero(lo, hi)]
        kept.append(zs)
        return vpns[~np.isin(vpns, zs)]

    def _slot_gone(self, slot: MmSlot, err: Exception) -> None:
        """The task exited (or shut us out) mid-scan: its items are gone, the slot goes
        to the remove list."""
        stats = self.k.stats
        if not slot.exited:  # else __ksm_exit() already counted it
            stats.dropped(err)
            stats.nr_added_process -= 1
        self.k.mm.remove(slot)
        stats.end_slot()

    def slot_done(self, slot: MmSlot, elapsed: float) -> None:
        """The end of a slot in scan_get_next_rmap_item(): newcomer and frozen states
        end, the merge window moves, and the slot is (re)placed in the VIP order.  An
        mm that exited meanwhile goes to the remove list (ksm_test_exit() at the mm's
        end), its items freed with the others at the scan's end."""
        if slot.exited:
            self.k.mm.remove(slot)
            self.k.stats.end_slot()
            return
        slot.clear(KSM_MM_NEWCOMER | KSM_MM_FROZEN)
        slot.set(KSM_MM_SCANNED)
        self.k.mm.place_vip(slot, self.k.stats.slot_nr_merged)
        slot.elapsed = elapsed
        self.k.stats.end_slot()

    # -- one chunk -----------------------------------------------------------------

    def _scan_chunk(
        self, slot: MmSlot, bases: np.ndarray, rids: np.ndarray, part: Rmap, data: memoryview | None,
        lo: np.ndarray, hi: np.ndarray, old: Rmap, pos: int, at: int, inplace: bool = False,
    ) -> tuple[int, int]:
        """get_next_rmap_item() + cmp_and_merge_page() for the pages of `part` (contents
        in `data`, None when not read, digests `lo`/`hi`), a view of the slot's new rmap
        list whose vpn column is already set (`inplace`: a view of the old list itself,
        whose items are these pages'); `at` is the unstable tree's number of its first
        item.  Returns the position in the slot's old rmap list
        after these pages, and how many were scanned."""
        k = self.k
        # the chunk's stable items leave their KSM pages at their scan positions, and
        # its walks of the stable tree collapse what chains they reach (StableTree.walked())
        k.merger.chunk = part
        last_walk: int | None = None
        try:
            end, skipped, walks = self._scan_chunk_items(slot, bases, rids, part, data, lo, hi, old, pos, at,
                                                         inplace)
            last_walk = self._last_walk(slot, part, lo, hi, walks)
        finally:
            k.merger.chunk = None
            k.stable.chunk_done(last_walk)
        n = int(part.vpn.shape[0])
        k.stats.pages_scanned += n - skipped
        slot.nr_scans += n - skipped
        return end, n - skipped

    def _scan_chunk_items(
        self, slot: MmSlot, bases: np.ndarray, rids: np.ndarray, part: Rmap, data: memoryview | None,
        lo: np.ndarray, hi: np.ndarray, old: Rmap, pos: int, at: int, inplace: bool,
    ) -> tuple[int, int, list[np.ndarray]]:
        """_scan_chunk()'s work: returns the old list's position after the chunk, the
        pages the policy skipped, and the pages handed to cmp_and_merge_page()."""
        k = self.k
        vpns = part.vpn
        n = int(vpns.shape[0])

        if inplace:
            end = pos + n
            matched = (part.flags & GONE) == 0
            if not matched.all():  # freed by a THP split, the page back: a new item
                self._renew(part, np.flatnonzero(~matched), rids, bases)
        else:
            end = self._get_next_rmap_items(part, old, pos, rids, bases)
            matched = self._matched
        self._chunk_end = end
        k.stats.rmap_items += n - int(np.count_nonzero(matched))
        if part.tracks_digests:
            part.dlo[:] = lo
            part.dhi[:] = hi
        flags = part.flags
        if slot.test(KSM_MM_FROZEN):
            # an old item keeps the frozen bit only if it sat in the unstable tree
            frozen = ~matched | ((flags & UNSTABLE) != 0)
            flags[frozen] |= FROZEN
            flags[~frozen] &= NOT_FROZEN
        else:
            flags &= NOT_FROZEN

        # cmp_and_merge_page(): an unchanged KSM page is left alone
        stable_ok = k.stable.unchanged(flags, part.node, lo, hi)
        # hook: the policy's word on the other pages before cmp_and_merge_page() - LKSM
        # leaves them all to it; mainline ksmd skips some (smart_scan: visited, not
        # scanned) and gates the rest on their checksum first (lksmfs.engine.ksmd).  The
        # chunk goes in address-ordered parts where that order shows (_broken_bounds).
        skipped = 0
        chunk: Chunk | None = None
        handed: list[np.ndarray] = []
        for a, b in self._broken_bounds(part, lo, stable_ok):
            outside = stable_ok.copy()
            outside[:a] = True
            outside[b:] = True
            idx, skip = k.crawler.visit(part, hi, outside)
            skipped += skip
            if idx.size:
                if chunk is None:
                    chunk = Chunk(slot, bases, rids, part, data, lo, hi, self._fetcher(slot, part), at)
                k.merger.cmp_and_merge(chunk, idx)
                handed.append(idx)
        return end, skipped, handed

    def _last_walk(self, slot: MmSlot, part: Rmap, lo: np.ndarray, hi: np.ndarray,
                   handed: list[np.ndarray]) -> int | None:
        """The scan position (2i + 1) of the chunk's last walk of the stable tree that
        collapses chains, None for none.  Mainline's cmp_and_merge_page() walks it
        (stable_tree_search(), whose chain_prune() reaches stable_node_dup()) for every
        page past smart_scan and the checksum gate (`handed`) but those merged with the
        zero page (try_to_merge_with_zero_page() comes first) and those a THP split took
        away; LKSM's 5.4 walks collapse only on a prune (StableTree.prune_chains())."""
        k = self.k
        if k.policy != POLICY_KSM or not handed:
            return None
        idx = np.concatenate(handed) if len(handed) > 1 else handed[0]
        if k.tunables.use_zero_pages:
            idx = idx[~k.digest.is_zero(lo[idx], hi[idx])]
        if slot.thp_zero.size:
            idx = idx[~thp.vanished(slot, part.vpn[idx])]
        return 2 * int(idx.max()) + 1 if idx.size else None

    def _broken_bounds(self, part: Rmap, lo: np.ndarray, stable_ok: np.ndarray) -> list[tuple[int, int]]:
        """The parts of a chunk to settle one after the other: the whole chunk, unless a
        broken merge (a STABLE item whose page changed) frees room in a KSM page whose
        content an earlier page of the chunk has.  In the kernel that earlier page looks
        the KSM page up before the broken item leaves it (remove_rmap_item_from_tree()
        runs at the item's own visit, in address order), so it may find it full; a
        policy that takes items out of the trees for the whole chunk first (mainline's
        checksum gate, smart_scan) would free the room too early.  The chunk is then cut
        before each such broken item."""
        n = int(stable_ok.shape[0])
        broken = np.flatnonzero(((part.flags & STABLE) != 0) & ~stable_ok)
        if not broken.size:
            return [(0, n)]
        others = np.flatnonzero(~stable_ok)
        keys, first = np.unique(normkey(lo[others]), return_index=True)
        node_keys = normkey(self.k.stable.lo[part.node[broken]])
        at = np.minimum(np.searchsorted(keys, node_keys), keys.shape[0] - 1)
        earlier = (keys[at] == node_keys) & (others[first[at]] < broken)
        cuts = broken[earlier].tolist()
        if not cuts:
            return [(0, n)]
        edges = [0, *cuts, n]
        return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]

    @staticmethod
    def _renew(part: Rmap, i: np.ndarray, rids: np.ndarray, bases: np.ndarray) -> None:
        """Items `i` of `part` start again, as new items of their pages would."""
        part.flags[i] = 0
        part.seq[i] = 0
        part.cksum[i] = 0
        part.node[i] = -1
        if part.tracks_regions:
            part.region[i] = rids[i]
            part.off[i] = (part.vpn[i] - bases[i]).astype(np.uint32)
        if part.tracks_ages:
            part.age[i] = 0
            part.skips[i] = 0

    def _get_next_rmap_items(self, part: Rmap, old: Rmap, pos: int, rids: np.ndarray, bases: np.ndarray) -> int:
        """get_next_rmap_item() for a chunk: items of the old list at these addresses are
        reused (moved into `part`), the ones passed by are freed, and new items start in
        the VMA's region.  Sets `_matched` (which pages had an item); returns the
        position in the old list after the chunk."""
        k = self.k
        vpns = part.vpn
        n = int(vpns.shape[0])
        end = int(np.searchsorted(old.vpn, vpns[-1], side="right"))
        seg = old.vpn[pos:end]
        j = np.searchsorted(seg, vpns)
        jc = np.minimum(j, max(seg.shape[0] - 1, 0))
        matched = (j < seg.shape[0]) & (seg[jc] == vpns) if seg.shape[0] else np.zeros(n, dtype=bool)
        if matched.any():  # an item a THP split freed (GONE) is no item: its page gets a new one
            mi = np.flatnonzero(matched)
            matched[mi[(old.flags[pos + j[mi]] & GONE) != 0]] = False
        keep = np.zeros(seg.shape[0], dtype=bool)
        keep[j[matched]] = True
        if not keep.all():
            # freed as the scanner passes them: before the next page's own visit
            gone = pos + np.flatnonzero(~keep)
            k.merger.remove_items(old.take(gone), 2 * np.searchsorted(vpns, old.vpn[gone]))

        tracks = part.tracks_regions
        if tracks:
            part.region[:] = rids
            part.off[:] = (vpns - bases).astype(np.uint32)
        if matched.any():
            src = pos + j[matched]
            part.flags[matched] = old.flags[src]
            part.seq[matched] = old.seq[src]
            part.cksum[matched] = old.cksum[src]
            part.node[matched] = old.node[src]
            if tracks:
                part.region[matched] = old.region[src]
                part.off[matched] = old.off[src]
            if part.tracks_ages:  # mainline smart_scan state (lksmfs.engine.ksmd)
                part.age[matched] = old.age[src]
                part.skips[matched] = old.skips[src]
        self._matched = matched
        return end
