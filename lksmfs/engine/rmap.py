"""A slot's rmap list as parallel numpy columns, sorted by virtual page number.

The kernel keeps one `struct rmap_item` (64 bytes) per tracked page in a sorted singly
linked list; here the same fields live in columns, 28 bytes a page (20 without
LKSM_FILTER, which alone needs `region` and `off`; 2 of them are mainline's smart_scan
state, `age` and `skips`), and 16 more for the page's digest where the source can tell
whether a process ran since its last scan:

    vpn     uint64  address >> PAGE_SHIFT
    flags   uint8   UNSTABLE_FLAG / STABLE_FLAG / the LKSM frozen bit
    seq     uint8   low bits of the round it entered the unstable tree (SEQNR_MASK)
    cksum   uint32  oldchecksum
    node    int32   stable node when STABLE
    region  int32   LKSM_FILTER region the page was accounted to (rmap_item->region)
    off     uint32  page offset inside its VMA (rmap_item->base_addr)
    age     uint8   mainline's rmap_item->age (smart_scan: visits, saturating at 255)
    skips   uint8   mainline's rmap_item->remaining_skips (smart_scan)
    dlo/dhi uint64/uint32  the page's digest at its last visit (no kernel field: see scanner.py)
"""

from __future__ import annotations

import numpy as np

UNSTABLE = np.uint8(0x1)
STABLE = np.uint8(0x2)
FROZEN = np.uint8(0x4)
# the page a THP split took away during this scan (lksmfs.engine.thp): the item is freed
# already (counted), and leaves the list at the slot's next scan
GONE = np.uint8(0x8)
NOT_UNSTABLE = np.uint8(~int(UNSTABLE) & 0xFF)
NOT_TREE = np.uint8(~int(STABLE | UNSTABLE) & 0xFF)
NOT_FROZEN = np.uint8(~int(FROZEN) & 0xFF)
SEQNR_MASK = 0xFF  # rmap_item->address & SEQNR_MASK: the round of an unstable entry
CKSUM_MASK = np.uint64(0xFFFFFFFE)  # calc_checksum() keeps bit 0 for the frozen flag


def calc_checksum(hi: np.ndarray) -> np.ndarray:
    """calc_checksum() of pages from their digests (`hi`): what rmap_item->oldchecksum
    holds, compared at the next visit (the checksum gate)."""
    ck: np.ndarray = (hi & CKSUM_MASK).astype(np.uint32)
    return ck


def checksum_changed(rm: Rmap, idx: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The checksum gate of cmp_and_merge_page() for items `idx` of `rm` (page digests
    `hi`): which show a checksum other than the one recorded at their last visit - a
    frozen task's page never fails it (LKSM) - and the checksums they show now."""
    ck = calc_checksum(hi)
    changed: np.ndarray = ((rm.flags[idx] & FROZEN) == 0) & (rm.cksum[idx] != ck)
    return changed, ck

COLUMNS: dict[str, type] = {
    "vpn": np.uint64,
    "flags": np.uint8,
    "seq": np.uint8,
    "cksum": np.uint32,
    "node": np.int32,
    "region": np.int32,
    "off": np.uint32,
    # mainline ksmd's smart_scan state (rmap_age_t, one byte each): lksmfs.engine.ksmd
    "age": np.uint8,
    "skips": np.uint8,
    # the page's 96-bit digest at its last visit: with it the scanner need not read
    # again a page of a process that has not run since (kept where the source can tell)
    "dlo": np.uint64,
    "dhi": np.uint32,  # a digest's hi fits (pages.HI_MASK)
}

# kept only with LKSM_FILTER (nothing reads them without it)
REGION_COLUMNS = ("region", "off")
# kept only when the source can tell whether a process ran (MemorySource.cpu_mark)
DIGEST_COLUMNS = ("dlo", "dhi")
# kept only for mainline's policy (smart_scan: lksmfs.engine.ksmd)
AGE_COLUMNS = ("age", "skips")


def _size(cols: tuple[str, ...]) -> int:
    return sum(np.dtype(COLUMNS[c]).itemsize for c in cols)


BYTES_PER_ITEM = _size(tuple(COLUMNS))  # every column
BYTES_PER_ITEM_NO_FILTER = BYTES_PER_ITEM - _size(REGION_COLUMNS)
BYTES_PER_ITEM_NO_DIGESTS = BYTES_PER_ITEM - _size(DIGEST_COLUMNS)
BYTES_PER_ITEM_NO_AGES = BYTES_PER_ITEM - _size(AGE_COLUMNS)


def _absent(dtype: type, n: int) -> np.ndarray:
    """A column that is not kept: n zeros that take no memory (read-only)."""
    return np.broadcast_to(np.zeros(1, dtype=dtype), (n,))


_KEPT: dict[tuple[bool, bool, bool], tuple[str, ...]] = {
    (r, d, a): tuple(c for c in COLUMNS if (r or c not in REGION_COLUMNS) and (d or c not in DIGEST_COLUMNS)
                     and (a or c not in AGE_COLUMNS))
    for r in (False, True) for d in (False, True) for a in (False, True)
}
_ALL = tuple(COLUMNS)


class Rmap:
    """One block of rmap items (a whole slot, or one scanned chunk of it).  Columns
    nothing will read are not kept: `tracks_regions` False without LKSM_FILTER,
    `tracks_digests` False when the source cannot tell whether a process ran,
    `tracks_ages` False but for mainline's policy."""

    __slots__ = (*COLUMNS, "tracks_regions", "tracks_digests", "tracks_ages")

    vpn: np.ndarray
    flags: np.ndarray
    seq: np.ndarray
    cksum: np.ndarray
    node: np.ndarray
    region: np.ndarray
    off: np.ndarray
    age: np.ndarray
    skips: np.ndarray
    dlo: np.ndarray
    dhi: np.ndarray
    tracks_regions: bool
    tracks_digests: bool
    tracks_ages: bool

    def __init__(self, n: int = 0, tracks_regions: bool = True, tracks_digests: bool = False,
                 tracks_ages: bool = False) -> None:
        self.tracks_regions = tracks_regions
        self.tracks_digests = tracks_digests
        self.tracks_ages = tracks_ages
        kept = _KEPT[tracks_regions, tracks_digests, tracks_ages]
        for name, dt in COLUMNS.items():
            setattr(self, name, np.zeros(n, dtype=dt) if name in kept else _absent(dt, n))
        if n:
            self.node[:] = -1

    def __len__(self) -> int:
        return int(self.vpn.shape[0])

    def _kept(self) -> tuple[str, ...]:
        return _KEPT[self.tracks_regions, self.tracks_digests, self.tracks_ages]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, c).nbytes for c in self._kept())

    def _new_like(self) -> Rmap:
        out = Rmap.__new__(Rmap)
        out.tracks_regions = self.tracks_regions
        out.tracks_digests = self.tracks_digests
        out.tracks_ages = self.tracks_ages
        return out

    def _derived(self, cols: dict[str, np.ndarray]) -> Rmap:
        out = self._new_like()
        n = int(cols["vpn"].shape[0])
        for c, dt in COLUMNS.items():
            setattr(out, c, cols[c] if c in cols else _absent(dt, n))
        return out

    def view(self, start: int, stop: int) -> Rmap:
        """Items [start, stop) sharing this block's memory (the hot path: plain slices)."""
        out = self._new_like()
        for c in _ALL:  # a slice of a column that is not kept is still a free broadcast
            setattr(out, c, getattr(self, c)[start:stop])
        return out

    def take(self, idx: np.ndarray | slice) -> Rmap:
        return self._derived({c: getattr(self, c)[idx] for c in self._kept()})

    def copy(self, n: int) -> Rmap:
        """A compact copy of the first `n` items (a scan that visited fewer pages than
        it allocated for gives the rest back)."""
        return self._derived({c: getattr(self, c)[:n].copy() for c in self._kept()})

    def fill_from(self, other: Rmap, n: int) -> None:
        """Items [0, n) of `other` become this block's first n items (columns `other`
        does not keep stay zero)."""
        theirs = set(other._kept())
        for c in self._kept():
            if c in theirs:
                getattr(self, c)[:n] = getattr(other, c)[:n]

    def find(self, vpn: int) -> int:
        """Index of `vpn`, or -1."""
        i = int(np.searchsorted(self.vpn, np.uint64(vpn)))
        if i < len(self) and int(self.vpn[i]) == vpn:
            return i
        return -1
