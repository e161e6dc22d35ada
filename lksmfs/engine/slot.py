"""struct mm_slot with the LKSM extensions, and the ordered scan list."""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Iterator

import numpy as np

from lksmfs.engine.params import KSM_MM_FROZEN, KSM_MM_LISTED, KSM_MM_NEWCOMER, KSM_MM_SCANNED, MERGE_WIN
from lksmfs.engine.rmap import Rmap
from lksmfs.sources.base import Mapping, TaskId


class MmSlot:
    """One registered process: its state bits, merge window, and rmap list."""

    __slots__ = (
        "sid", "task", "comm", "state", "merge_win", "merge_idx", "nr_merged",
        "scanning_size", "fault_cnt", "elapsed", "nr_scans", "rmap", "zero_vpns",
        "regions", "marked", "vip_seq", "removed", "cpu_mark", "thp_blocks", "split_blocks", "thp_zero",
        "exited", "madvised",
    )

    def __init__(self, sid: int, task: TaskId, comm: str, frozen: bool) -> None:
        self.sid = sid
        self.task = task
        self.comm = comm
        # __ksm_enter_alloc_slot(): a frozen newcomer or a listed newcomer
        self.state = (KSM_MM_FROZEN if frozen else KSM_MM_LISTED) | KSM_MM_NEWCOMER
        self.merge_win = [0] * MERGE_WIN
        self.merge_idx = 0
        self.nr_merged = 0
        self.scanning_size = 0
        self.fault_cnt = 0
        self.elapsed = 0.0
        self.nr_scans = 0
        self.rmap = Rmap()
        self.zero_vpns = np.zeros(0, dtype=np.uint64)  # pages merged with the zero page
        # Transparent huge pages (lksmfs.engine.thp): the blocks (vpn // 512) mapped as a
        # huge page that no merge has split yet, the ones a merge split, and the pages a
        # split gave the shared zero page (zero-filled then)
        self.thp_blocks = np.zeros(0, dtype=np.int64)
        self.split_blocks: set[int] = set()
        self.thp_zero = np.zeros(0, dtype=np.uint64)
        self.regions: set[int] = set()  # lksm_region_ref list
        self.marked = MarkedVmas()  # the VMAs ksm_join() has marked VM_MERGEABLE
        self.cpu_mark: Hashable | None = None  # MemorySource.cpu_mark before its last scan
        self.vip_seq = -1  # position in vips_list, -1 when not in it
        self.removed = False
        # __ksm_exit() ran for it (ksm_nr_added_process already dropped); the slot under
        # the scanner's cursor stays registered until the scanner meets the exit
        self.exited = False
        # registered by ksm_madvise()'s __ksm_enter() and not ksm_join()ed since: only the
        # VMAs the task marked itself (`mg`) are VM_MERGEABLE
        self.madvised = False

    def merge_scope(self, maps: list[Mapping]) -> list[Mapping]:
        """The VMAs the scanner may visit: every one ksm_join() marked; for a slot only
        madvise registered (a short task: ksm_join() skips it), only those with
        VM_MERGEABLE from the task's own madvise() or prctl()."""
        if not self.madvised:
            return maps
        return [m if m.vm_mergeable or not m.mergeable else dataclasses.replace(m, mergeable=False) for m in maps]

    def test(self, bit: int) -> bool:
        return bool(self.state & bit)

    def set(self, bit: int) -> None:
        self.state |= bit

    def clear(self, bit: int) -> None:
        self.state &= ~bit

    def account_nr_merge(self, nr_merged: int) -> int:
        """lksm_account_mm_slot_nr_merge(): the merges of the last MERGE_WIN scans."""
        self.merge_win[self.merge_idx] = nr_merged
        self.merge_idx = (self.merge_idx + 1) % MERGE_WIN
        self.nr_merged = sum(self.merge_win)
        return self.nr_merged

    def state_names(self) -> str:
        names = [
            n for bit, n in (
                (KSM_MM_FROZEN, "frozen"), (KSM_MM_LISTED, "listed"),
                (KSM_MM_NEWCOMER, "newcomer"), (KSM_MM_SCANNED, "scanned"),
            ) if self.state & bit
        ]
        return ",".join(names) or "-"


class MarkedVmas:
    """The VMAs of one mm that carry VM_MERGEABLE, as the source described them at their
    last ksm_join().  The kernel keeps the flag on the VMA itself; from /proc a VMA is
    the same one when it overlaps a marked VMA of the same file (or both are
    anonymous): growing, shrinking and splitting keep the flag.  The source's own
    Mapping objects are kept (no copy of each: a scope holds thousands)."""

    __slots__ = ("_vmas",)

    def __init__(self, vmas: list[Mapping] | None = None) -> None:
        self._vmas = sorted(vmas or [], key=_start)

    def __len__(self) -> int:
        return len(self._vmas)

    def covers(self, start: int, end: int, file: tuple[int, int] | None) -> bool:
        """Was a VMA overlapping [start, end) with this file marked?"""
        i = bisect.bisect_left(self._vmas, end, key=_start) - 1
        while i >= 0:
            v = self._vmas[i]
            if v.end <= start:
                return False  # sorted, non-overlapping: nothing further left overlaps
            if v.file == file:
                return True
            i -= 1
        return False


def _start(vma: Mapping) -> int:
    return vma.start


class ScanList:
    """ksm_scan_head.scan_list: slots waiting to be scanned, in order."""

    def __init__(self) -> None:
        self._d: OrderedDict[int, MmSlot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, slot: MmSlot) -> bool:
        return slot.sid in self._d

    def __iter__(self) -> Iterator[MmSlot]:
        return iter(list(self._d.values()))

    def add_tail(self, slot: MmSlot) -> None:
        if slot.sid not in self._d:
            self._d[slot.sid] = slot

    def add_head(self, slot: MmSlot) -> None:
        self._d[slot.sid] = slot
        self._d.move_to_end(slot.sid, last=False)

    def remove(self, slot: MmSlot) -> None:
        self._d.pop(slot.sid, None)

    def first(self) -> MmSlot | None:
        """The slot the scanner takes next (lksmfs.engine.fastpass looks before it leaps)."""
        return next(iter(self._d.values()), None)

    def pop_first(self) -> MmSlot | None:
        if not self._d:
            return None
        _, slot = self._d.popitem(last=False)
        return slot

    def clear(self) -> None:
        self._d.clear()


class MmList:
    """Every registered mm_slot and the lists it is on: mm_slots_hash/ksm_mm_head
    (`slots`), ksm_scan_head.scan_list, ksm_scan.remove_mm_list and vips_list."""

    def __init__(self) -> None:
        self.slots: dict[TaskId, MmSlot] = {}
        self._by_sid: dict[int, MmSlot] = {}
        self._next_sid = 1
        self.scan_list = ScanList()
        self.remove_list: list[MmSlot] = []
        self.vips: dict[int, MmSlot] = {}  # vips_list, ordered on use
        self._vip_seq = 0

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, task: TaskId) -> MmSlot | None:
        return self.slots.get(task)

    def by_sid(self, sid: int) -> MmSlot | None:
        """The slot an unstable tree entry names, or None once it left."""
        return self._by_sid.get(sid)

    def alloc(self, task: TaskId, comm: str, faults: int, anon: int, frozen: bool, queue: bool) -> MmSlot:
        """__ksm_enter_alloc_slot(): registered, and queued at the tail of the scan list
        unless run=2 is in progress (`queue`)."""
        slot = MmSlot(self._next_sid, task, comm, frozen)
        self._next_sid += 1
        slot.fault_cnt = faults
        slot.scanning_size = anon
        self.slots[task] = slot
        self._by_sid[slot.sid] = slot
        if queue:
            self.scan_list.add_tail(slot)
        return slot

    def unlink(self, slot: MmSlot) -> None:
        """Off the hash, the scan list and the VIP list."""
        self.slots.pop(slot.task, None)
        self._by_sid.pop(slot.sid, None)
        self.scan_list.remove(slot)
        self.vips.pop(slot.sid, None)
        slot.vip_seq = -1
        slot.removed = True

    def remove(self, slot: MmSlot) -> None:
        """lksm_remove_mm_slot(): off every list, onto the remove list (freed when the
        scanner wraps its scan up)."""
        self.unlink(slot)
        self.remove_list.append(slot)

    def take_removed(self) -> list[MmSlot]:
        """lksm_flush_removed_mm_list()'s list_del_init of the remove list."""
        removed, self.remove_list = self.remove_list, []
        return removed

    def nr_frozen(self) -> int:
        """ksm_scan.nr_frozen: frozen slots waiting for their scan."""
        return sum(1 for s in self.scan_list if s.test(KSM_MM_FROZEN))

    def vips_by_merges(self) -> list[MmSlot]:
        """vips_list in rb-tree order: most merges in the window first, ties by age."""
        return sorted(self.vips.values(), key=lambda s: (-s.nr_merged, s.vip_seq))

    def place_vip(self, slot: MmSlot, nr_merged: int) -> None:
        """The end of a slot's scan: the merge window moves and the slot is (re)placed in
        vips_list, or taken off it when it merged nothing lately
        (lksm_account_mm_slot_nr_merge + lksm_insert_mm_slot_ordered)."""
        self.vips.pop(slot.sid, None)
        if slot.account_nr_merge(nr_merged):
            slot.vip_seq = self._vip_seq
            self._vip_seq += 1
            self.vips[slot.sid] = slot
        else:
            slot.vip_seq = -1
