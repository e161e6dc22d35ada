"""An open-addressing hash table in two numpy arrays: uint64 key -> int value.

The kernel keeps its stable and unstable trees as rb-trees ordered by memcmp().  We key
them by a 64-bit content hash instead (the full comparison still happens before any
merge), and store them here rather than in a dict: 12 or 16 bytes a slot (int32 or int64
values), no Python object per page, and lookups for a whole chunk of pages at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EMPTY = np.uint64(0)
TOMB = np.uint64(1)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(29)
_32 = np.uint64(32)


def normkey(keys: np.ndarray) -> np.ndarray:
    """Keys 0 and 1 are the empty/tombstone markers: fold them onto 2 and 3.

    A folded key can alias a real one; callers verify content after every hit anyway.
    """
    return np.where(keys < 2, keys + np.uint64(2), keys)


def _norm1(key: int) -> int:
    return key + 2 if key < 2 else key


_REHASH_BLOCK = 1 << 12  # slots moved at a time when the table grows (a dozen temporaries of 32 KiB)
MAX_LOAD_NUM, MAX_LOAD_DEN = 3, 4  # grow past 75% full
GROWTH_NUM, GROWTH_DEN = 3, 2  # ... to half again the room the entries need
MIN_CAPACITY = 1024


def slots_for(entries: int) -> int:
    """The capacity that holds `entries` at the maximum load."""
    return max(MIN_CAPACITY, -(-entries * MAX_LOAD_DEN // MAX_LOAD_NUM))


class HashIndex:
    """Linear probing, tombstones on delete, growing by half past 75% load.

    The unstable tree holds an entry for every page waiting for a partner, so its size
    is a large part of the engine's memory during a scan.  The capacity is any number of
    slots, not a power of two (a key's home slot is its hash scaled to the capacity,
    Lemire's fastrange): a table sized for a known number of entries gets that size,
    not up to twice it, and one that grows holds the old table and one half again as
    large side by side, not the old and one twice as large.  75% load keeps probe
    sequences short (about 2.5 slots for a hit, 8.5 for a miss)."""

    def __init__(self, capacity: int = MIN_CAPACITY, vals: type = np.int64) -> None:
        """Room for `capacity` entries; values of dtype `vals` (np.int32 saves a third)."""
        self._vdtype: np.dtype[Any] = np.dtype(vals)
        self._alloc(slots_for(capacity))

    def _alloc(self, cap: int) -> None:
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.vals = np.full(cap, -1, dtype=self._vdtype)
        self.capacity = cap
        self._cap = np.uint64(cap)
        self.used = 0  # live entries
        self.filled = 0  # live + tombstones

    def __len__(self) -> int:
        return self.used

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes

    def clear(self) -> None:
        if self.filled:
            self._alloc(MIN_CAPACITY if self.capacity > 4 * MIN_CAPACITY else self.capacity)

    def widen(self) -> None:
        """Values from here on may not fit int32: keep them as int64."""
        self._vdtype = np.dtype(np.int64)
        self.vals = self.vals.astype(np.int64)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = keys * _MIX
        h ^= h >> _SHIFT
        return (((h >> _32) * self._cap) >> _32).astype(np.int64)

    def _home1(self, key: int) -> int:
        h = (key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
        return ((h >> 32) * self.capacity) >> 32

    def _next(self, pos: np.ndarray) -> np.ndarray:
        pos += 1
        pos[pos == self.capacity] = 0
        return pos

    # -- vectorised ---------------------------------------------------------------

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """Values for `keys` (uint64, already normalised), -1 where absent."""
        n = keys.shape[0]
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or self.used == 0:
            return out
        pos = self._home(keys)
        idx = np.arange(n)
        tk = self.keys
        while idx.size:
            k = tk[pos]
            hit = k == keys[idx]
            if hit.any():
                out[idx[hit]] = self.vals[pos[hit]]
            go = ~hit & (k != EMPTY)
            idx = idx[go]
            pos = self._next(pos[go])
        return out

    def put_many(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert keys known to be absent and distinct from each other."""
        n = keys.shape[0]
        if n == 0:
            return
        self._reserve(n)
        pos = self._home(keys)
        idx = np.arange(n)
        tk = self.keys
        while idx.size:
            k = tk[pos]
            cand = np.flatnonzero((k == EMPTY) | (k == TOMB))
            placed = np.zeros(idx.size, dtype=bool)
            if cand.size:
                # one winner per free slot, without sorting: every candidate writes its
                # key there, the last write stays, and reading back names the winner
                wp = pos[cand]
                was_empty = k[cand] == EMPTY
                ck = keys[idx[cand]]
                tk[wp] = ck
                won = tk[wp] == ck
                self.filled += int(np.count_nonzero(was_empty & won))
                self.vals[wp[won]] = vals[idx[cand[won]]]
                placed[cand[won]] = True
            keep = ~placed
            idx = idx[keep]
            # losers on a free slot retry the same slot (now taken) -> advance all
            pos = self._next(pos[keep])
        self.used += n

    # -- scalar -------------------------------------------------------------------

    def _slot_of(self, key: int) -> int:
        """Position of a normalised key, or -1 (the probe stops at an empty slot)."""
        tk = self.keys
        cap = self.capacity
        p = self._home1(key)
        while True:
            k = int(tk[p])
            if k == key:
                return p
            if k == 0:
                return -1
            p += 1
            if p == cap:
                p = 0

    def get(self, key: int) -> int:
        p = self._slot_of(_norm1(key))
        return int(self.vals[p]) if p >= 0 else -1

    def put(self, key: int, val: int) -> None:
        """Insert or overwrite."""
        key = _norm1(key)
        self._reserve(1)
        tk = self.keys
        cap = self.capacity
        p = self._home1(key)
        first_free = -1
        while True:
            k = int(tk[p])
            if k == key:
                self.vals[p] = val
                return
            if k == 1 and first_free < 0:
                first_free = p
            if k == 0:
                break
            p += 1
            if p == cap:
                p = 0
        if first_free < 0:
            first_free = p
            self.filled += 1
        tk[first_free] = key
        self.vals[first_free] = val
        self.used += 1

    def delete(self, key: int, val: int | None = None) -> bool:
        """Remove `key` (only if it maps to `val`, when given)."""
        p = self._slot_of(_norm1(key))
        if p < 0 or (val is not None and int(self.vals[p]) != val):
            return False
        self.keys[p] = TOMB
        self.vals[p] = -1
        self.used -= 1
        return True

    def _reserve(self, extra: int) -> None:
        if (self.filled + extra) * MAX_LOAD_DEN <= self.capacity * MAX_LOAD_NUM:
            return
        need = self.used + extra
        cap = max(self.capacity, slots_for(need * GROWTH_NUM // GROWTH_DEN))
        # rehash: grows when needed, and always drops the tombstones.  The old arrays are
        # moved over a block at a time, so that next to the old and the new table only
        # one block's worth of temporaries exists (the peak of a growing tree)
        old_keys, old_vals = self.keys, self.vals
        self._alloc(cap)
        for b in range(0, old_keys.shape[0], _REHASH_BLOCK):
            k = old_keys[b : b + _REHASH_BLOCK]
            live = k > TOMB
            if live.any():
                self.put_many(k[live], old_vals[b : b + _REHASH_BLOCK][live])
