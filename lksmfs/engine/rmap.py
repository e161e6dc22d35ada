"""A slot's rmap list as parallel numpy columns, sorted by virtual page number.

The kernel keeps one `struct rmap_item` (64 bytes) per tracked page in a sorted singly
linked list; here the same fields live in columns, 28 bytes a page (20 without
LKSM_FILTER, which alone needs `region` and `off`; 2 of them are mainline's smart_scan
state, `age` and `skips`):

    vpn     uint64  address >> PAGE_SHIFT
    flags   uint8   UNSTABLE_FLAG / STABLE_FLAG / the LKSM frozen bit
    seq     uint8   low bits of the round it entered the unstable tree (SEQNR_MASK)
    cksum   uint32  oldchecksum
    node    int32   stable node when STABLE
    region  int32   LKSM_FILTER region the page was accounted to (rmap_item->region)
    off     uint32  page offset inside its VMA (rmap_item->base_addr)
    age     uint8   mainline's rmap_item->age (smart_scan: visits, saturating at 255)
    skips   uint8   mainline's rmap_item->remaining_skips (smart_scan)
"""

from __future__ import annotations

import numpy as np

UNSTABLE = np.uint8(0x1)
STABLE = np.uint8(0x2)
FROZEN = np.uint8(0x4)

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
}

BYTES_PER_ITEM = sum(np.dtype(t).itemsize for t in COLUMNS.values())
# kept only with LKSM_FILTER (nothing reads them without it): 20 bytes a page then
REGION_COLUMNS = ("region", "off")
BYTES_PER_ITEM_NO_FILTER = BYTES_PER_ITEM - sum(np.dtype(COLUMNS[c]).itemsize for c in REGION_COLUMNS)


_ALL = tuple(COLUMNS)
_NO_REGIONS = tuple(c for c in COLUMNS if c not in REGION_COLUMNS)


def _absent(dtype: type, n: int) -> np.ndarray:
    """A column that is not kept: n zeros that take no memory (read-only)."""
    return np.broadcast_to(np.zeros(1, dtype=dtype), (n,))


class Rmap:
    """One block of rmap items (a whole slot, or one scanned chunk of it).
    `tracks_regions` False: the region columns are not kept (no LKSM_FILTER)."""

    __slots__ = (*COLUMNS, "tracks_regions")

    vpn: np.ndarray
    flags: np.ndarray
    seq: np.ndarray
    cksum: np.ndarray
    node: np.ndarray
    region: np.ndarray
    off: np.ndarray
    age: np.ndarray
    skips: np.ndarray
    tracks_regions: bool

    def __init__(self, n: int = 0, tracks_regions: bool = True) -> None:
        self.tracks_regions = tracks_regions
        for name, dt in COLUMNS.items():
            kept = tracks_regions or name not in REGION_COLUMNS
            setattr(self, name, np.zeros(n, dtype=dt) if kept else _absent(dt, n))
        if n:
            self.node[:] = -1

    def __len__(self) -> int:
        return int(self.vpn.shape[0])

    def _kept(self) -> tuple[str, ...]:
        return _ALL if self.tracks_regions else _NO_REGIONS

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, c).nbytes for c in self._kept())

    def _derived(self, cols: dict[str, np.ndarray]) -> Rmap:
        out = Rmap.__new__(Rmap)
        out.tracks_regions = self.tracks_regions
        for c, a in cols.items():
            setattr(out, c, a)
        if not self.tracks_regions:
            n = int(cols["vpn"].shape[0])
            for c in REGION_COLUMNS:
                setattr(out, c, _absent(COLUMNS[c], n))
        return out

    def view(self, start: int, stop: int) -> Rmap:
        """Items [start, stop) sharing this block's memory (the hot path: plain slices)."""
        out = Rmap.__new__(Rmap)
        out.tracks_regions = self.tracks_regions
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
        """Items [0, n) of `other` become this block's first n items."""
        for c in self._kept():
            getattr(self, c)[:n] = getattr(other, c)[:n]

    def find(self, vpn: int) -> int:
        """Index of `vpn`, or -1."""
        i = int(np.searchsorted(self.vpn, np.uint64(vpn)))
        if i < len(self) and int(self.vpn[i]) == vpn:
            return i
        return -1
