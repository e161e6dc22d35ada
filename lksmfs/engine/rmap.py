"""A slot's rmap list as parallel numpy columns, sorted by virtual page number.

The kernel keeps one `struct rmap_item` (64 bytes) per tracked page in a sorted singly
linked list; here the same fields live in columns, 26 bytes a page:

    vpn     uint64  address >> PAGE_SHIFT
    flags   uint8   UNSTABLE_FLAG / STABLE_FLAG / the LKSM frozen bit
    seq     uint8   low bits of the round it entered the unstable tree (SEQNR_MASK)
    cksum   uint32  oldchecksum
    node    int32   stable node when STABLE
    region  int32   LKSM_FILTER region the page was accounted to (rmap_item->region)
    off     uint32  page offset inside its VMA (rmap_item->base_addr)
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
}

BYTES_PER_ITEM = sum(np.dtype(t).itemsize for t in COLUMNS.values())


class Rmap:
    """One block of rmap items (a whole slot, or one scanned chunk of it)."""

    __slots__ = tuple(COLUMNS)

    vpn: np.ndarray
    flags: np.ndarray
    seq: np.ndarray
    cksum: np.ndarray
    node: np.ndarray
    region: np.ndarray
    off: np.ndarray

    def __init__(self, n: int = 0) -> None:
        for name, dt in COLUMNS.items():
            setattr(self, name, np.zeros(n, dtype=dt))
        if n:
            self.node[:] = -1

    def __len__(self) -> int:
        return int(self.vpn.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, c).nbytes for c in COLUMNS)

    def view(self, start: int, stop: int) -> Rmap:
        """Items [start, stop) sharing this block's memory."""
        out = Rmap.__new__(Rmap)
        for c in COLUMNS:
            setattr(out, c, getattr(self, c)[start:stop])
        return out

    def take(self, idx: np.ndarray | slice) -> Rmap:
        out = Rmap.__new__(Rmap)
        for c in COLUMNS:
            setattr(out, c, getattr(self, c)[idx])
        return out

    def copy(self, n: int) -> Rmap:
        """A compact copy of the first `n` items (a scan that visited fewer pages than
        it allocated for gives the rest back)."""
        out = Rmap.__new__(Rmap)
        for c in COLUMNS:
            setattr(out, c, getattr(self, c)[:n].copy())
        return out

    def fill_from(self, other: Rmap, n: int) -> None:
        """Items [0, n) of `other` become this block's first n items."""
        for c in COLUMNS:
            getattr(self, c)[:n] = getattr(other, c)[:n]

    def find(self, vpn: int) -> int:
        """Index of `vpn`, or -1."""
        i = int(np.searchsorted(self.vpn, np.uint64(vpn)))
        if i < len(self) and int(self.vpn[i]) == vpn:
            return i
        return -1
