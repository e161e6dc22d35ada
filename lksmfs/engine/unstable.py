"""root_unstable_tree: the pages of one round waiting for a partner, by content.

The kernel's unstable tree is an rb-tree of rmap_items ordered by memcmp(); each node
lives inside its rmap_item.  Here it is a hash table (lksmfs.engine.hashindex) from a
page's 64-bit content key to the item waiting with it, and that item is named by one
32-bit number, not by (slot, address): the table is most of a round's transient memory
(an entry for every page whose content is found nowhere else), and 12 bytes a slot
instead of 16 keep a scan of unique memory under the kernel's 64 bytes per page.

The number is the item's position in the round's *visits*: every slot the scanner
enters gets a run of numbers as long as its new rmap list (`visit`), so an item is the
run's start plus its index in that list.  An entry is stale - the kernel would have
taken it out of the tree - when its slot left, when the slot was visited again since
(its items went through the tree again), or when the item no longer waits in the tree
of this round (flags and seqnr, as before).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np

from lksmfs.engine.hashindex import HashIndex

if TYPE_CHECKING:
    from lksmfs.engine.slot import MmSlot

_INT32_LIMIT = 2**31 - 1


class UnstableTree:
    """One round's tree: content key -> visit number of the waiting item."""

    def __init__(self, capacity: int = 0) -> None:
        self.index = HashIndex(capacity, vals=np.int32)
        self._starts: list[int] = []  # first number of each visit, increasing
        self._slots: list[MmSlot] = []  # the slot of each visit
        self._latest: dict[int, int] = {}  # slot id -> its latest visit
        self._next = 0

    # -- visits ------------------------------------------------------------------------

    def visit(self, slot: MmSlot, n: int) -> int:
        """The scanner enters `slot`, whose new list holds at most `n` items: the number
        of its item 0.  An earlier visit's entries of this slot turn stale."""
        start = self._next
        self._next += max(n, 1)
        if self._next > _INT32_LIMIT and self.index.vals.dtype != np.int64:
            self.index.widen()  # 2^31 pages in one round: 8 TiB scanned
        self._latest[slot.sid] = len(self._starts)
        self._starts.append(start)
        self._slots.append(slot)
        return start

    def where(self, ref: int) -> tuple[MmSlot, int] | None:
        """The slot and list index an entry names; None for an earlier visit."""
        v = bisect.bisect_right(self._starts, ref) - 1
        slot = self._slots[v]
        if self._latest.get(slot.sid) != v:
            return None
        return slot, ref - self._starts[v]

    def where_many(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(visit, list index) of each entry (refs >= 0)."""
        starts = np.asarray(self._starts, dtype=np.int64)
        v = np.searchsorted(starts, refs, side="right") - 1
        return v, refs - starts[v]

    def visit_slot(self, v: int) -> MmSlot | None:
        """The slot of visit `v`, or None when the slot was visited again since."""
        slot = self._slots[v]
        return slot if self._latest.get(slot.sid) == v else None

    # -- the table ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        return self.index.get_many(keys)

    def put_many(self, keys: np.ndarray, refs: np.ndarray) -> None:
        self.index.put_many(keys, refs)

    def get(self, key: int) -> int:
        return self.index.get(key)

    def put(self, key: int, ref: int) -> None:
        self.index.put(key, ref)

    def delete(self, key: int, ref: int) -> bool:
        return self.index.delete(key, ref)
