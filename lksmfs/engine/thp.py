"""Transparent huge pages under KSM: the split before a merge, and what it does to zeros.

mm/ksm.c's try_to_merge_one_page() splits a large folio before it merges one of its
pages (split_huge_page()).  From Linux 6.12 on, the split of an anonymous THP maps the
pages that hold only zeros to the shared zero page (mm/huge_memory.c __folio_split():
RMP_USE_SHARED_ZEROPAGE): they stop being anonymous pages, so KSM never merges them,
and a merge of such a page itself fails (write_protect_page() finds it no more).

Shadow mode splits nothing, so a slot keeps what the kernel would have done: the blocks
(vpn // 512) mapped as a PMD-sized THP that no merge has split yet (`thp_blocks`, from
the source at each scan), the blocks a merge split (`split_blocks`), and the pages a
split gave the zero page (`thp_zero`) - absent, like pages merged with the zero page,
for as long as they hold only zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lksmfs.engine.context import ThpCtx
from lksmfs.engine.slot import MmSlot
from lksmfs.sources.base import AccessDenied, ProcessGone

HPAGE_PMD_ORDER = 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER


def blocks_of(vpns: np.ndarray) -> np.ndarray:
    return (vpns.astype(np.uint64) >> np.uint64(HPAGE_PMD_ORDER)).astype(np.int64)


def _member(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of `x` are in `sorted_values` (a binary search each: np.isin sorts or
    hashes both sides, every call)."""
    if not sorted_values.size:
        return np.zeros(x.shape[0], dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, x), sorted_values.shape[0] - 1)
    found: np.ndarray = sorted_values[at] == x
    return found


def in_unsplit(slot: MmSlot, vpns: np.ndarray) -> np.ndarray:
    """Which of these pages of `slot` are in a THP no merge has split."""
    return _member(slot.thp_blocks, blocks_of(vpns))


def vanished(slot: MmSlot, vpns: np.ndarray) -> np.ndarray:
    """Which of these pages of `slot` a split gave the shared zero page."""
    return _member(slot.thp_zero, vpns.astype(np.uint64))


def is_unsplit(slot: MmSlot, vpn: int) -> bool:
    """in_unsplit() for one page."""
    b = slot.thp_blocks
    return bool(b.size) and bool((b == vpn >> HPAGE_PMD_ORDER).any())


def is_vanished(slot: MmSlot, vpn: int) -> bool:
    """vanished() for one page."""
    z = slot.thp_zero
    if not z.size:
        return False
    at = int(np.searchsorted(z, np.uint64(vpn)))
    return at < z.shape[0] and int(z[at]) == vpn


Known = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (vpns, digest lo, digest hi)


def split(k: ThpCtx, slot: MmSlot, block: int, known: Known = ()) -> None:
    """split_huge_page() of the THP at `block`: it is split for good, and its pages that
    hold only zeros now get the shared zero page.  Their digests come from `known` (the
    chunk being scanned, or the items of this round), the other pages are read."""
    slot.thp_blocks = slot.thp_blocks[slot.thp_blocks != block]
    slot.split_blocks.add(block)
    first = block * HPAGE_PMD_NR
    vpns = np.arange(first, first + HPAGE_PMD_NR, dtype=np.uint64)
    zero = np.zeros(HPAGE_PMD_NR, dtype=bool)
    have = np.zeros(HPAGE_PMD_NR, dtype=bool)
    for kv, klo, khi in known:  # (vpns ascending)
        a, b = np.searchsorted(kv, [vpns[0], vpns[-1] + np.uint64(1)])
        if b > a:
            at = (kv[a:b] - vpns[0]).astype(np.intp)
            zero[at] = k.digest.is_zero(klo[a:b], khi[a:b])
            have[at] = True
    need = np.flatnonzero(~have)
    if need.size:
        try:
            lo, hi = k.digest.pages(k.source.read_pages(slot.task, vpns[need]), int(need.size))
        except (ProcessGone, AccessDenied):
            return  # the task left: its slot goes with it
        zero[need] = k.digest.is_zero(lo, hi)
    if zero.any():
        z, new = slot.thp_zero, vpns[zero]
        if z.size and z[-1] >= new[0]:
            slot.thp_zero = np.union1d(z, new)
        else:  # the usual case: splits come in address order
            slot.thp_zero = np.concatenate([z, new])


def merge_fails(k: ThpCtx, slot: MmSlot, vpn: int, known: Known = ()) -> bool:
    """try_to_merge_one_page() for page `vpn` of `slot`, as far as THPs go: a THP is split
    first; the merge fails if the page is (now) the zero page."""
    if is_unsplit(slot, vpn):
        split(k, slot, vpn >> HPAGE_PMD_ORDER, known)
    return is_vanished(slot, vpn)
