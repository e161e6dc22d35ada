"""What each part of the engine may see of the others: one Protocol per part.

The `Ksm` façade (ksm.py) builds the parts and hands each itself, typed as the narrow
interface below that the part needs: structural typing, so `Ksm` satisfies every one of
them with its own attributes (no wrapper, no indirection on the hot paths), and mypy
checks that the part touches nothing else.  Where a part calls another through the
façade (the scanner the merger, a policy the scanner, ...), it sees that part through
a smaller protocol here too.  So no part imports ksm.py, and the engine's imports form a
tree: this module imports only leaves (the trees, slots, regions, counters, pages), and
no leaf imports it.

A member is a plain attribute where the part rebinds it, a read-only property otherwise.
The members several parts read are grouped once (Shared, Filtered, Timed, Registrar)
and each part's protocol is made of those groups and its own members.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Protocol

import numpy as np

from lksmfs.engine.advisor import AdvisorCtx
from lksmfs.engine.pages import Chunk, Digest
from lksmfs.engine.params import Tunables
from lksmfs.engine.regions import RegionTable
from lksmfs.engine.rmap import Rmap
from lksmfs.engine.slot import MmList, MmSlot
from lksmfs.engine.stable import StableTree
from lksmfs.engine.stats import KsmStats, Record, Skipped
from lksmfs.engine.unstable import UnstableTree
from lksmfs.sources.base import MemorySource, TaskId

# -- the scheduling policy: Ksm.crawler --------------------------------------------------


class ScanPolicy(Protocol):
    """What the engine asks its scheduling policy (LKSM's crawler, or mainline ksmd's):
    the façade, the scanner, the merger and the fast path hold it as `crawler`."""

    crawl_round: int

    def crawl(self, now: float) -> float | None:
        """One pass of the policy's thread at `now`; when to run next (None: when woken)."""
        ...

    def prepare_full_scan(self, now: float | None = None) -> int:
        """Queue every slot for a full scan; returns how many are queued."""
        ...

    def prepare_partial_scan(self) -> int:
        """Queue the slots of a partial scan; returns how many are queued."""
        ...

    def hint(self, task: TaskId, frozen: bool) -> None:
        """The freezer hook: `task` froze or thawed."""
        ...

    def forget(self, task: TaskId) -> None:
        """`task` exited: drop any pending hint for it."""
        ...

    def unmerged(self) -> None:
        """run=2 undid every merge."""
        ...

    def checksum_gate(self, scan_round: int) -> bool:
        """Must an unfrozen page's checksum be stable before it enters the unstable tree?"""
        ...

    def filtering_allowed(self, slot: MmSlot) -> bool:
        """May LKSM_FILTER skip pages of this slot?"""
        ...

    def scan_starting(self, mode: int) -> None:
        """The scanner starts a scan in `mode`."""
        ...

    def scan_wrapped(self, mode: int) -> None:
        """The scanner wrapped a scan in `mode` up."""
        ...

    def visit(self, part: Rmap, hi: np.ndarray, ksm_page: np.ndarray) -> tuple[np.ndarray, int]:
        """A chunk's pages before cmp_and_merge_page(): the indices it must settle (not
        the unchanged KSM pages, `ksm_page`) and how many were skipped (visited, not
        scanned); `hi` is the high half of each page's digest."""
        ...

    def scanner_may_run(self) -> bool:
        """May the scanner run a batch of the scan it was handed now?"""
        ...


# -- thp.py: split_huge_page() before a merge --------------------------------------------


# -- what several parts share (the Ctx protocols below are made of these) -----------------


class Shared(Protocol):
    """What every part but thp reads: the registered slots (ksm_mm_head and its lists),
    the counters, the tunables."""

    @property
    def mm(self) -> MmList: ...

    @property
    def stats(self) -> KsmStats: ...

    @property
    def tunables(self) -> Tunables: ...


class Filtered(Shared, Protocol):
    """... with LKSM_FILTER's state: whether it is on, and the regions."""

    @property
    def filter_enabled(self) -> bool: ...

    @property
    def regions(self) -> RegionTable: ...


class Timed(Protocol):
    """A part that runs on the engine's clock and makes its changes visible to sysfs
    readers (Ksm.publish())."""

    @property
    def clock(self) -> Callable[[], float]: ...

    def publish(self) -> None: ...


class Registrar(Protocol):
    """A policy that registers tasks: our own pid (never registered) and Ksm.skipped,
    the tasks it passed over and why."""

    @property
    def self_pid(self) -> int | None: ...

    @property
    def skipped(self) -> dict[TaskId, Skipped]: ...


class ThpCtx(Protocol):
    """thp.split() and thp.merge_fails() (called by the merger): the digest that tells a
    zero page, and the source to read the pages of a split THP nobody has digested."""

    @property
    def digest(self) -> Digest: ...

    @property
    def source(self) -> MemorySource: ...


# -- merge.py: Merger ---------------------------------------------------------------------


class ScannerForMerger(Protocol):
    """The scanner's cursor (struct ksm_scan) as the merger reads it: the round (seqnr)
    that dates unstable tree items, the items of the slot being scanned, and where pages
    merged with the zero page go."""

    @property
    def scan_round(self) -> int: ...

    def current_items(self) -> Rmap: ...

    def add_zero_pages(self, vpns: np.ndarray) -> None: ...


class MergerCtx(ThpCtx, Filtered, Protocol):
    """The merger (cmp_and_merge_page() and friends): the trees and counters it changes,
    the regions a merge is accounted in (LKSM_FILTER), the slots that may hold an
    unstable tree partner, the policy's checksum gate, the scanner's cursor, and what
    thp.py needs (ThpCtx), to which it passes itself."""

    @property
    def crawler(self) -> ScanPolicy: ...

    @property
    def scanner(self) -> ScannerForMerger: ...

    @property
    def stable(self) -> StableTree: ...

    @property
    def unstable(self) -> UnstableTree: ...


# -- scanner.py: Scanner ------------------------------------------------------------------


class MergerForScanner(Protocol):
    """The merger as the scanner calls it: a chunk to settle (and whose items are the
    chunk's), which pages of a piece may merge (the filter watch), the items the scan
    frees, the buffers a scan's end gives back."""

    chunk: Rmap | None

    def cmp_and_merge(self, c: Chunk, idx: np.ndarray) -> None: ...

    def may_merge(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray: ...

    def remove_items(self, rm: Rmap, at: np.ndarray | None = None) -> None: ...

    def release_buffers(self) -> None: ...


class ScannerCtx(ThpCtx, Filtered, Timed, Protocol):
    """The scanner (ksmd and its cursor): the memory it reads and digests, the slots,
    regions and trees it walks, the unstable tree it starts afresh each round
    (rebinds), the counters it moves, the last scan's record (rebinds), the policy's
    answers, the merger, and the façade's publish() and lksm_flush_removed_mm_list()."""

    last_scan: Record
    unstable: UnstableTree

    @property
    def crawler(self) -> ScanPolicy: ...

    @property
    def merger(self) -> MergerForScanner: ...

    @property
    def policy(self) -> str: ...

    @property
    def stable(self) -> StableTree: ...

    def flush_removed_mm_list(self) -> None: ...


# -- crawler.py: LksmCrawler ---------------------------------------------------------------


class ScannerForCrawler(Protocol):
    """The scanner as a policy hands it a scan: the mode it sets, the wake-up, what is
    queued, whether a scan is in progress and which slot is under the cursor."""

    scan_mode: int

    @property
    def cur(self) -> MmSlot | None: ...

    @property
    def scan_state(self) -> bool: ...

    def queued(self) -> int: ...

    def wake(self) -> None: ...


class CrawlerCtx(Filtered, Timed, Registrar, Protocol):
    """LKSM's crawler (ksm_crawld): the tasks it finds through the source and joins
    (short-task threshold, our own pid), the slots and regions ksm_join() registers, the
    counters and Ksm.skipped it fills, the tunables it reads and sets, the scanner it
    hands scans to, and the façade's ksm_exit() and publish()."""

    @property
    def scanner(self) -> ScannerForCrawler: ...

    @property
    def short_task_ms(self) -> int: ...

    @property
    def source(self) -> MemorySource: ...

    def ksm_exit(self, slot: MmSlot) -> None: ...


# -- ksmd.py: KsmdPolicy -------------------------------------------------------------------


class ScannerForKsmd(ScannerForCrawler, Protocol):
    """The scanner as mainline's policy hands it a pass: as the crawler does, and whether
    the cursor is at the list head (advisor_start_scan())."""

    @property
    def at_head(self) -> bool: ...


class MergerForKsmd(Protocol):
    """The merger as mainline's policy calls it: smart_scan's skipped and the checksum
    gate's failed pages leave their tree; an exited mm's items are freed at once."""

    def remove_from_tree(self, blk: Rmap, idx: np.ndarray, at: np.ndarray | None = None) -> None: ...

    def remove_items(self, rm: Rmap, at: np.ndarray | None = None) -> None: ...


class KsmdCtx(Shared, Timed, Registrar, Protocol):
    """Mainline ksmd's policy: the source it narrows to registered mms (rebinds it to a
    MainlineView), the slots it registers and queues, the counters and Ksm.skipped it
    fills, the tunables and the KSM advisor (timed by the engine's clock and the
    scanner's CPU time), the scanner and the merger, and the façade's task_exit() and
    publish()."""

    source: MemorySource

    @property
    def advisor(self) -> AdvisorCtx: ...

    @property
    def merger(self) -> MergerForKsmd: ...

    @property
    def scan_cpu_ns(self) -> Callable[[], int]: ...

    @property
    def scanner(self) -> ScannerForKsmd: ...

    def task_exit(self, task: TaskId) -> None: ...


# -- fastpass.py: FastScanner -------------------------------------------------------------


class ScannerForFastScan(Protocol):
    """The scanner as the fast path drives it: batches (one slot at a time when asked),
    the cursor's step to the next slot and a slot's end, the cursor's state, and the
    state it is left in between whole passes run elsewhere (it clears `cur` itself
    after a quiet slot)."""

    cur: MmSlot | None
    one_slot: bool

    @property
    def at_head(self) -> bool: ...

    @property
    def gen(self) -> Generator[int, None, None] | None: ...

    @property
    def last_prune(self) -> float: ...

    @property
    def scan_state(self) -> bool: ...

    @property
    def started(self) -> bool: ...

    def batch(self, npages: int | None = None) -> None: ...

    def between_passes(self, scan_round: int, unstable_hint: int, last_prune: float, record: Record) -> None: ...

    def next_slot(self) -> MmSlot | None: ...

    def slot_done(self, slot: MmSlot, elapsed: float) -> None: ...


class MergerForFastScan(Protocol):
    """The merger as the fast path calls it for a quiet slot: its visited items leave
    their tree, its waiting pages enter this round's unstable tree."""

    def remove_from_tree(self, blk: Rmap, idx: np.ndarray, at: np.ndarray | None = None) -> None: ...

    def unstable_insert(self, blk: Rmap, i: np.ndarray, lo: np.ndarray, refs: np.ndarray,
                        stale: bool = False) -> None: ...


class FastScanCtx(ThpCtx, Filtered, Timed, Protocol):
    """The fast path (lksmfs.engine.fastpass, built by `lksmfs compare` on a Ksm): the
    keyed source and digest it names contents with, the state it proves quiet (trees,
    regions, tunables, policy), the counters and slots a quiet scan moves, the scanner it
    drives, the merger and the policy, and the façade's publish()."""

    @property
    def crawler(self) -> ScanPolicy: ...

    @property
    def merger(self) -> MergerForFastScan: ...

    @property
    def policy(self) -> str: ...

    @property
    def scanner(self) -> ScannerForFastScan: ...

    @property
    def stable(self) -> StableTree: ...

    @property
    def unstable(self) -> UnstableTree: ...
