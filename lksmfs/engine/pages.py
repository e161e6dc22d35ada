"""Page contents as the engine sees them: 96-bit digests, and the zero page.

The kernel's trees compare pages with memcmp(); the engine keys its trees by a 96-bit
digest of each page instead (xxh3-128 with the high word's top half dropped: 4 bytes less
per tracked page, and still no collision expected among 2^40 pages) and compares bytes
before every merge.  A digest is kept as two uint64 columns (lo, hi < 2^32) so a chunk of
pages is looked up at once; an rmap item keeps hi in 32 bits.

A `Chunk` is what the scanner hands the merger: pages being scanned, with their items,
contents and digests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

from lksmfs.engine.rmap import Rmap
from lksmfs.engine.slot import MmSlot
from lksmfs.sources.base import PAGE_SIZE

CHUNK = 2048  # pages the scanner digests and merges per vectorised step
# pages read at a time: a chunk larger than this is read block by block and only its
# digests are kept (a comparison reads again the pages it needs): 256 KiB of buffer, not 8 MiB
READ_BLOCK = 64

HI_MASK = np.uint64(0xFFFFFFFF)  # the bits of the high word a digest keeps

_SLICES = [slice(o, o + PAGE_SIZE) for o in range(0, CHUNK * PAGE_SIZE, PAGE_SIZE)]


def digest_pages(data: memoryview | bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 96-bit digest of each page, as (lo, hi) uint64 columns."""
    mv = memoryview(data)
    h = xxhash.xxh3_128_digest
    slices = _SLICES[:n] if n <= CHUNK else [slice(o, o + PAGE_SIZE) for o in range(0, n * PAGE_SIZE, PAGE_SIZE)]
    raw = b"".join([h(mv[s]) for s in slices])
    a = np.frombuffer(raw, dtype=">u8").reshape(n, 2).astype(np.uint64)
    return a[:, 1].copy(), a[:, 0] & HI_MASK


DigestFn = Callable[[memoryview | bytes, int], tuple[np.ndarray, np.ndarray]]


class Digest:
    """The engine's digest of page contents, given to it (Ksm(digest=...)) rather than
    looked up as a module global: `pages(data, n)` gives each page's (lo, hi), and the
    zero page is told by its own digest under the same function (a test's weak digest,
    whose collisions exercise the byte comparisons, tells it as the scanner does)."""

    def __init__(self, pages: DigestFn = digest_pages) -> None:
        self.pages = pages
        lo, hi = pages(bytes(PAGE_SIZE), 1)
        self.zero_lo, self.zero_hi = int(lo[0]), int(hi[0])

    def is_zero(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Which digests are the zero page's (bytes still to be checked before a merge)."""
        zero: np.ndarray = (lo == np.uint64(self.zero_lo)) & (hi == np.uint64(self.zero_hi))
        return zero


XXH3 = Digest()  # the default: xxh3-128 cut to 96 bits
ZERO_LO, ZERO_HI = XXH3.zero_lo, XXH3.zero_hi
is_zero_digest = XXH3.is_zero


def as_words(data: memoryview | bytes) -> np.ndarray:
    """Pages as rows of uint64 words, for vectorised byte-for-byte comparisons."""
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)


@dataclass
class Chunk:
    """Up to CHUNK consecutive pages being scanned, of one VMA or several: their rmap
    items (`part`, a view of the slot's new rmap list), contents and digests, and for
    each page its VMA's start and region (ksm_scan.vma_base_addr and ksm_scan.region
    when the scanner visited it).  Item i of `part` is number `at` + i in the unstable
    tree (UnstableTree.visit)."""

    slot: MmSlot
    base: np.ndarray  # uint64 per page: its VMA's first page
    rid: np.ndarray  # int32 per page: its region
    part: Rmap
    # the pages, valid for the chunk (partner reads go to another buffer); None when
    # they are not kept - digests known from the last scan, or a chunk larger than
    # pages.READ_BLOCK - and `fetch` reads what a comparison needs
    data: memoryview | bytes | None
    lo: np.ndarray
    hi: np.ndarray
    fetch: Callable[[np.ndarray], np.ndarray] | None = None
    at: int = 0

    def words(self, i: np.ndarray) -> np.ndarray:
        """Pages `i` of the chunk as rows of words (a copy), for memcmp_pages()."""
        if self.data is not None:
            rows: np.ndarray = as_words(self.data)[i]
            return rows
        assert self.fetch is not None
        return self.fetch(i)

    def offsets(self, i: np.ndarray) -> np.ndarray:
        """Page offsets of items `i` from the VMA's start (rmap_item->base_addr)."""
        offs: np.ndarray = (self.part.vpn[i] - self.base[i]).astype(np.int64)
        return offs
