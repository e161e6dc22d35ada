"""LKSM_FILTER: per-region bitmap filters of page offsets that ever merged.

Mirrors the CONFIG_LKSM_FILTER half of mm/lksm.c (seed 000_9da3ef7a1f87f7e5).  A region
is "the original" of many VMAs: all heaps share one region, a library's written .data
pages (anonymous pages in a private file mapping) form a file_data region keyed by the
file, and the anonymous mapping after it (.bss) a file_bss region.  Each file region
records, per page offset from the VMA's start, whether a page there ever merged; once
the region is old enough, slots that are neither newcomers nor frozen scan only those
offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from bitarray import bitarray

from lksmfs.sources.base import Mapping

BITS_PER_LONG = 64
SINGLE_FILTER_LEN = 1  # a region of <= 64 pages fits one word
LKSM_REGION_MATURE = 5
LKSM_REGION_ITER_MAX = 8  # DLL look-back limit


class RegionType(IntEnum):
    """enum lksm_region_type, in the kernel's order (region_share prints the first five)."""

    HEAP = 0
    STACK = 1
    FILE1 = 2  # file_data
    FILE2 = 3  # file_bss
    CONFLICT = 4
    UNKNOWN = 5


REGION_TYPE_STR = ("heap", "stack", "file_data", "file_bss", "conflicted", "unknown")

HEAP_REGION = 0
UNKNOWN_REGION = 1


def region_len(npages: int) -> int:
    """Filter length in 64-bit words (lksm_bitmap_size), 1 for regions of <= 64 pages."""
    if npages > BITS_PER_LONG:
        return (npages >> 6) + (1 if npages % BITS_PER_LONG else 0)
    return SINGLE_FILTER_LEN


@dataclass
class Region:
    """struct lksm_region."""

    rid: int
    type: RegionType
    len: int
    key: tuple[int, int] | None  # file identity (the seed uses i_ino)
    scan_round: int  # birth round
    merge_cnt: int = 0
    filter_cnt: int = 0
    conflict: int = 0
    refcount: int = 0
    next: int = -1  # the bss region of a data region
    prev: int = -1
    bits: bitarray | None = None  # None: the filter array is not allocated

    def _nbits(self) -> int:
        return self.len * BITS_PER_LONG

    def skipped(self) -> bool:
        """lksm_region_skipped(): the filter is not usable yet.  For a single-word region
        the pointer aliases the word itself, so "no filter" means "no bit set"."""
        if self.len > SINGLE_FILTER_LEN:
            return self.bits is None
        return self.filter_cnt == 0

    def mature(self, scan_round: int) -> bool:
        return scan_round - self.scan_round > LKSM_REGION_MATURE

    def set_offset(self, offset: int) -> None:
        """The filter half of stable_tree_append_region()."""
        self.set_offsets(np.array([offset], dtype=np.int64))

    def set_offsets(self, offsets: np.ndarray) -> None:
        """set_offset() for many pages: test_and_set_bit() on each, filter_cnt counting
        the bits that were not set yet (an offset past the filter sets nothing)."""
        if self.bits is None:
            self.bits = bitarray(self._nbits())
            self.bits.setall(0)
        inside = offsets[(offsets >= 0) & (offsets < len(self.bits))]
        if not inside.size:
            return
        before = self.bits.count()
        self.bits[np.unique(inside).tolist()] = 1
        self.filter_cnt += self.bits.count() - before

    def grow(self, new_len: int) -> None:
        """Resize in lksm_find_next_vma(): a larger zeroed filter, old bits copied."""
        bits = bitarray(new_len * BITS_PER_LONG)
        bits.setall(0)
        if self.filter_cnt > 0 and self.bits is not None:
            bits[: len(self.bits)] = self.bits
        self.bits = bits
        self.len = new_len

    def filtered_offsets(self, offsets: np.ndarray) -> np.ndarray:
        """Boolean mask: which offsets the filter lets through (bits beyond the filter
        never pass: find_next_bit() returns past the end)."""
        assert self.bits is not None or self.len == SINGLE_FILTER_LEN
        if self.bits is None:
            return np.zeros(offsets.shape[0], dtype=bool)
        bits = np.frombuffer(self.bits.unpack(), dtype=np.uint8).astype(bool)
        inside = offsets < bits.shape[0]
        out = np.zeros(offsets.shape[0], dtype=bool)
        out[inside] = bits[offsets[inside]]
        return out


@dataclass
class RegionTable:
    """All regions, the heap and unknown singletons, and the region_share counters."""

    regions: dict[int, Region] = field(default_factory=dict)
    by_key: dict[tuple[int, int], int] = field(default_factory=dict)
    nr_regions: int = 0  # lksm_nr_regions: allocated, never decremented (as the seed)
    region_share: list[int] = field(default_factory=lambda: [0] * len(RegionType))
    _next_rid: int = 2

    def __post_init__(self) -> None:
        self.regions[HEAP_REGION] = Region(HEAP_REGION, RegionType.HEAP, 0, None, 0)
        self.regions[UNKNOWN_REGION] = Region(UNKNOWN_REGION, RegionType.UNKNOWN, 0, None, 0)

    def get(self, rid: int) -> Region:
        r = self.regions.get(rid)
        return r if r is not None else self.regions[UNKNOWN_REGION]

    # -- finding the file a VMA's anonymous pages belong to ----------------------

    @staticmethod
    def file_of(maps: list[Mapping], i: int) -> tuple[tuple[int, int] | None, RegionType]:
        """The file and region type of maps[i] (lksm_register_file_anon_region() and
        lksm_find_region() share this walk): its own file (data), the previous
        mergeable file mapping (bss), or up to 8 mappings back (the DLL layout)."""
        vma = maps[i]
        if vma.file is not None:
            return vma.file, RegionType.FILE1
        if i == 0:
            return None, RegionType.UNKNOWN
        prev = maps[i - 1]
        if prev.mergeable and prev.file is not None:
            return prev.file, RegionType.FILE2
        file: tuple[int, int] | None = None
        j = i - 1
        steps = 0
        while steps <= LKSM_REGION_ITER_MAX and j >= 0:
            p = maps[j]
            if file is None:
                file = p.file
            elif p.file is not None and p.file != file:
                break
            if p.mergeable and file is not None:
                return file, RegionType.FILE2
            j -= 1
            steps += 1
        return None, RegionType.UNKNOWN

    @staticmethod
    def is_file_anon_candidate(vma: Mapping) -> bool:
        """What ksm_join() registers: not heap, not stack, not exec, has anon pages."""
        return vma.mergeable and not vma.is_heap and not vma.is_stack and not vma.is_exec and vma.has_anon

    # -- registration (ksm_join) --------------------------------------------------

    def register(self, maps: list[Mapping], i: int, crawl_round: int) -> int | None:
        """lksm_register_file_anon_region(): returns the region id the slot now refers to."""
        key, rtype = self.file_of(maps, i)
        if key is None:
            return None
        rid = self._insert(self.by_key.get(key), key, maps[i], rtype, crawl_round)
        region = self.regions[rid]
        return rid if rtype == RegionType.FILE1 else region.next

    def _new(self, rtype: RegionType, key: tuple[int, int], npages: int, crawl_round: int) -> Region:
        rid = self._next_rid
        self._next_rid += 1
        r = Region(rid, rtype, region_len(npages), key, crawl_round)
        self.regions[rid] = r
        self.nr_regions += 1
        return r

    def _insert(
        self, rid: int | None, key: tuple[int, int], vma: Mapping, rtype: RegionType, crawl_round: int
    ) -> int:
        """lksm_insert_region(): the data region (created FILE1, sized by this VMA, even
        when the VMA is the bss) and, for a bss VMA, its `next` region."""
        if rid is None:
            region = self._new(RegionType.FILE1, key, vma.npages, crawl_round)
            self.by_key[key] = region.rid
        else:
            region = self.regions[rid]
        if rtype == RegionType.FILE2 and region.next < 0:
            nxt = self._new(RegionType.FILE2, key, vma.npages, crawl_round)
            region.next = nxt.rid
            nxt.prev = region.rid
        return region.rid

    # -- scanning (lksm_find_region / lksm_find_next_vma) ------------------------

    def find(self, maps: list[Mapping], i: int, cached: int, crawl_round: int) -> int:
        """lksm_find_region(): the region maps[i]'s pages belong to, HEAP_REGION, or
        UNKNOWN_REGION (the seed's NULL).  `cached` is ksm_scan.region, the region the
        scanner used last in this mm (-1 at a slot's start)."""
        vma = maps[i]
        if vma.is_heap:
            return HEAP_REGION
        if vma.is_stack or not vma.has_anon or vma.is_exec:
            return UNKNOWN_REGION
        key, rtype = self.file_of(maps, i)
        rid: int | None = None
        if key is not None:
            c = self.regions.get(cached)
            if c is not None and c.key == key:
                if c.type == rtype:
                    return c.rid
                if c.type == RegionType.FILE1:
                    rid = c.rid
            else:
                rid = self.by_key.get(key)
        if rid is None:
            return UNKNOWN_REGION
        if rtype == RegionType.FILE2:
            region = self.regions[rid]
            if region.next < 0:
                self._insert(rid, key, vma, rtype, crawl_round)  # type: ignore[arg-type]
            return region.next
        return rid

    def is_file(self, rid: int) -> bool:
        """A data or bss region: filtered, size-checked, and its merges set filter bits."""
        return self.get(rid).type in (RegionType.FILE1, RegionType.FILE2)

    def size_mismatch(self, rid: int, npages: int) -> bool:
        """The size test of lksm_find_next_vma(): a mapping of more than one word of
        pages whose filter length differs from the region's."""
        n = region_len(npages)
        return n > SINGLE_FILTER_LEN and self.get(rid).len != n

    def size_check(self, rid: int, npages: int) -> bool:
        """One pass of lksm_find_next_vma()'s size check, which the seed runs for every
        page the scanner visits: a size difference counts a conflict; the first one of
        a larger mapping resizes the filter, the second conflicts the region (never
        filtered again).  Returns False when the region is conflicted now."""
        if not self.size_mismatch(rid, npages):
            return True
        region = self.regions[rid]
        n = region_len(npages)
        region.conflict += 1
        if region.conflict > 1:
            region.type = RegionType.CONFLICT
            region.bits = None
            region.filter_cnt = 0
            region.len = SINGLE_FILTER_LEN
            return False
        if region.len < n:
            region.grow(n)
        return True

    # -- accounting ---------------------------------------------------------------

    def account_merge(self, rid: int, offset: int) -> None:
        """stable_tree_append_region() for one page."""
        self._account(self.get(rid), np.array([offset], dtype=np.int64), 1)

    def account_merges(self, rids: np.ndarray, offsets: np.ndarray) -> None:
        """stable_tree_append_region() for many pages at once."""
        for rid in np.unique(rids).tolist():
            sel = rids == rid
            self._account(self.get(int(rid)), offsets[sel], int(np.count_nonzero(sel)))

    def _account(self, region: Region, offsets: np.ndarray, n: int) -> None:
        """Record the offsets in a file region's filter and count the merges by type."""
        if region.type in (RegionType.FILE1, RegionType.FILE2):
            region.set_offsets(offsets.astype(np.int64, copy=False))
        region.merge_cnt += n
        self.region_share[region.type] += n

    def use_filter(self, rid: int, scan_round: int) -> bool:
        region = self.get(rid)
        return (
            region.type not in (RegionType.HEAP, RegionType.UNKNOWN, RegionType.CONFLICT)
            and region.mature(scan_round)
            and not region.skipped()
        )

    # -- lifetime -----------------------------------------------------------------

    def ref(self, rid: int) -> None:
        self.regions[rid].refcount += 1

    def unref(self, rid: int) -> None:
        """lksm_region_ref_remove(): a data region lives while its bss region does."""
        region = self.regions.get(rid)
        if region is None:
            return
        region.refcount -= 1
        if region.refcount <= 0:
            self._maybe_free(region)

    def _maybe_free(self, region: Region) -> None:
        if region.refcount > 0 or region.next >= 0 or region.rid in (HEAP_REGION, UNKNOWN_REGION):
            return
        del self.regions[region.rid]
        if region.key is not None and self.by_key.get(region.key) == region.rid:
            del self.by_key[region.key]
        if region.prev >= 0:
            prev = self.regions.get(region.prev)
            if prev is not None:
                prev.next = -1
                self._maybe_free(prev)

    def share(self) -> dict[str, int]:
        return {REGION_TYPE_STR[t]: self.region_share[t] for t in RegionType}
