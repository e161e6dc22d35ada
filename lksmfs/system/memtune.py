"""Process-wide allocator settings for a long-running scanner.

glibc raises its mmap threshold every time a large block is freed, so after the
engine swaps a slot's rmap columns (megabytes) later medium-sized arrays land on the
brk heap, interleave with long-lived ones and keep RSS up after they are freed.
Pinning the threshold at its default keeps every large array in its own mapping,
returned to the kernel when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold; False where there is no glibc mallopt()."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
