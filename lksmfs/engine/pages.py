"""Page contents as the engine sees them: 96-bit digests, and the zero page.

The kernel's trees compare pages with memcmp(); the engine keys its trees by a 96-bit
digest of each page instead (xxh3-128 with the high word's top half dropped: 4 bytes less
per tracked page, and still no collision expected among 2^40 pages) and compares bytes
before every merge.  A digest is kept as two uint64 columns (lo, hi < 2^32) so a chunk of
pages is looked up at once; an rmap item keeps hi in 32 bits.
"""

from __future__ import annotations

import numpy as np
import xxhash

from lksmfs.sources.base import PAGE_SIZE

CHUNK = 2048  # pages the scanner digests and merges per vectorised step
# pages read at a time: a chunk larger than this is read block by block and only its
# digests are kept (a comparison reads again the pages it needs): 256 KiB of buffer, not 8 MiB
READ_BLOCK = 64

HI_MASK = np.uint64(0xFFFFFFFF)  # the bits of the high word a digest keeps

_ZERO_DIGEST = xxhash.xxh3_128_digest(bytes(PAGE_SIZE))
ZERO_HI = int.from_bytes(_ZERO_DIGEST[:8], "big") & int(HI_MASK)
ZERO_LO = int.from_bytes(_ZERO_DIGEST[8:], "big")


_SLICES = [slice(o, o + PAGE_SIZE) for o in range(0, CHUNK * PAGE_SIZE, PAGE_SIZE)]


def digest_pages(data: memoryview | bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 96-bit digest of each page, as (lo, hi) uint64 columns."""
    mv = memoryview(data)
    h = xxhash.xxh3_128_digest
    slices = _SLICES[:n] if n <= CHUNK else [slice(o, o + PAGE_SIZE) for o in range(0, n * PAGE_SIZE, PAGE_SIZE)]
    raw = b"".join([h(mv[s]) for s in slices])
    a = np.frombuffer(raw, dtype=">u8").reshape(n, 2).astype(np.uint64)
    return a[:, 1].copy(), a[:, 0] & HI_MASK


def is_zero_digest(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Which digests are the zero page's (bytes still to be checked before a merge)."""
    zero: np.ndarray = (lo == np.uint64(ZERO_LO)) & (hi == np.uint64(ZERO_HI))
    return zero


def as_words(data: memoryview | bytes) -> np.ndarray:
    """Pages as rows of uint64 words, for vectorised byte-for-byte comparisons."""
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
