"""The stable tree: KSM pages, their mapping counts, and max_page_sharing chains.

Mirrors the stable_node side of mm/ksm.c.  A stable node stands for one KSM page: in
shadow mode the page is its 96-bit content digest (lo/hi), fixed when the node was
created from two pages compared byte for byte.  `rmap_hlist_len` counts the mappings.
When every node with some content is full (rmap_hlist_len == max_page_sharing), a new
node for the same content is chained: the kernel's stable_node chain with its dups.
Counters follow the kernel: ksm_pages_shared counts nodes with at least one mapping,
ksm_pages_sharing the mappings beyond the first, ksm_stable_node_chains/_dups the chains
and the nodes inside them.

A chain left with a single dup (its other dups lost their last mapping) collapses back
into a plain node.  Mainline (6.11+, "mm/ksm: optimize the chain()/chain_prune()
interfaces") does it in stable_node_dup() whenever a walk of the stable tree - any
stable_tree_search() or stable_tree_insert() - passes through the chain and finds its
dup alone (hlist_is_singular_node()), full or not: `walked()`.  Linux 5.4 (LKSM's base)
did it only in a pruning stable_tree_search() and only onto a dup with room:
`prune_chains()`.  Which chains a walk passes through depends on the rb-tree's memcmp
order, which digests do not give: every walk counts as passing through every chain -
exact for the tree's root, and for a small tree; in a large one the kernel may need a
few more walks to reach a deep chain.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lksmfs.engine.hashindex import HashIndex, normkey
from lksmfs.engine.rmap import STABLE


class _Grow:
    """A growable column of one dtype."""

    __slots__ = ("a",)

    def __init__(self, dtype: type, fill: int = 0) -> None:
        self.a: np.ndarray = np.full(1024, fill, dtype=dtype)

    def ensure(self, n: int, fill: int = 0) -> None:
        if n > self.a.shape[0]:
            cap = self.a.shape[0]
            while cap < n:
                cap += cap // 4  # a quarter more: at most 25% unused (doubling: 50%)
            b = np.full(cap, fill, dtype=self.a.dtype)
            b[: self.a.shape[0]] = self.a
            self.a = b


def _chain_ref(cid: int) -> int:
    return -(cid + 2)


class StableTree:
    """Stable nodes in columns; the index maps a digest's low half to a node or a chain."""

    def __init__(self, prune_clock: Callable[[], tuple[float, int]] | None = None) -> None:
        # (now in seconds, stable_node_chains_prune_millisecs): stable_node_dup()'s
        # jiffies and its prune interval (the engine's clock and tunable)
        self.prune_clock: Callable[[], tuple[float, int]] = prune_clock or (lambda: (0.0, 2000))
        self.index = HashIndex(vals=np.int32)  # a node, or a chain (negative)
        self._lo = _Grow(np.uint64)
        self._hi = _Grow(np.uint32)  # a digest's hi fits (pages.HI_MASK)
        self._len = _Grow(np.int32)
        self._chain = _Grow(np.int32, -1)
        self._next_id = 0
        self._free: list[int] = []
        # chain -> its dups in the reverse order of the chain's hlist: the last is the head
        # (stable_node_chain_add_dup() adds at the head; stable_node_dup() moves there)
        self.chains: dict[int, dict[int, None]] = {}
        self._prune_time: dict[int, float] = {}  # chain -> its chain_prune_time
        # chain -> dups that may have room (a full one is dropped when a search meets it)
        self._room: dict[int, dict[int, None]] = {}
        # chain -> where it was left with a single dup: the scan position (see walked())
        # of the removal that did it, -1 for before the chunk being scanned
        self._singular: dict[int, int] = {}
        self.at = -1  # the scan position of the removal under way (set by the merger)
        self._next_chain = 0
        self.nr_nodes = 0  # live stable nodes (each has >= 1 mapping)
        self.pages_shared = 0
        self.pages_sharing = 0
        self.stable_node_chains = 0
        self.stable_node_dups = 0

    # -- columns ------------------------------------------------------------------

    @property
    def lo(self) -> np.ndarray:
        return self._lo.a

    @property
    def hi(self) -> np.ndarray:
        return self._hi.a

    @property
    def nlen(self) -> np.ndarray:
        return self._len.a

    @property
    def nbytes(self) -> int:
        n = self._next_id
        return self.index.nbytes + n * (8 + 4 + 4 + 4)

    # -- search / insert ----------------------------------------------------------

    def search(self, lo: int, hi: int, max_page_sharing: int) -> int:
        """stable_tree_search(): a node with this content that can take one more mapping,
        a chain's dup as stable_node_dup() picks it (the lookup's effects on the chain
        applied); -1 if none."""
        ref = self.index.get(lo)
        if ref == -1:
            return -1
        if ref >= 0:
            if not self._same(ref, lo, hi) or int(self._len.a[ref]) >= max_page_sharing:
                return -1
            return ref
        rooms = self.looked_up(ref, lo, hi, max_page_sharing, 1)
        return rooms[0][0] if rooms else -1

    def rooms(self, lo: int, hi: int, max_page_sharing: int) -> list[tuple[int, int]]:
        """Every node with this content that can take more mappings, with how many, in
        the order repeated stable_tree_search() calls would fill them."""
        return self.rooms_at(self.index.get(lo), lo, hi, max_page_sharing)

    def rooms_at(self, ref: int, lo: int, hi: int, max_page_sharing: int) -> list[tuple[int, int]]:
        """rooms() where the index's entry for the content (`ref`: a node, a chain, or -1)
        was looked up already, for many contents at once (HashIndex.get_many)."""
        if ref == -1:
            return []
        if ref >= 0:
            n = int(self._len.a[ref])
            if not self._same(ref, lo, hi) or n >= max_page_sharing:
                return []
            return [(ref, max_page_sharing - n)]
        return self._chain_rooms(-ref - 2, lo, hi, max_page_sharing)

    def chain_candidates(self, refs: np.ndarray) -> np.ndarray:
        """For index entries that are chains: the chain's dup that may have room when it
        is the only one (the usual case: full dups leave the candidate set as a lookup
        meets them; either rule of stable_node_dup() picks an only candidate), else -1 -
        rooms_at() then tells.  The caller applies the lookups with looked_up()."""
        room = self._room
        cands = [room[-r - 2] for r in refs.tolist()]
        return np.array([next(iter(d)) if len(d) == 1 else -1 for d in cands], dtype=np.int64)

    def unchanged(self, flags: np.ndarray, node: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Which items (their flags and node columns, the pages' digests) are unchanged
        KSM pages: STABLE, with their node's content - cmp_and_merge_page() leaves them
        alone; a STABLE one that is not is a broken merge."""
        stable = (flags & STABLE) != 0
        nd = np.where(stable, node, 0)
        ok: np.ndarray = stable & (self._lo.a[nd] == lo) & (self._hi.a[nd] == hi)
        return ok

    def _same(self, nid: int, lo: int, hi: int) -> bool:
        """Is node `nid`'s content this digest (the index folds keys 0 and 1 onto 2 and 3,
        so its hit alone does not say)?"""
        return int(self._lo.a[nid]) == lo and int(self._hi.a[nid]) == hi

    def _chain_rooms(self, cid: int, lo: int, hi: int, max_page_sharing: int,
                     limit: int | None = None) -> list[tuple[int, int]]:
        """The dups of a chain with room, in the order repeated stable_node_dup() calls at
        this moment fill them (nothing changed): a lookup walks the hlist from its head
        and, unless it prunes, takes the first page-sharing candidate; when it prunes
        (chain_prune() from stable_tree_search(), once stable_node_chains_prune_millisecs
        have passed since chain_prune_time, which it then resets) it takes the fullest
        candidate, the first in list order among equals.  Either way the dup found goes
        to the head when it can take one more mapping, so the next lookups (not pruning,
        or pruning and finding it fuller still) keep taking it until it is full: a dup
        is filled whole before the next one is chosen.  Full dups met leave the
        candidate set.  `limit`: stop once that many mappings are placed."""
        cands = self._room[cid]
        nlen = self._len.a
        order = self.chains[cid]
        rest: list[tuple[int, int]] = []
        for nid in list(cands):
            n = int(nlen[nid])
            if n >= max_page_sharing:
                del cands[nid]
            elif self._same(nid, lo, hi):
                rest.append((nid, n))
        if not rest:
            return []
        if len(rest) > 1:
            pos = {nid: i for i, nid in enumerate(reversed(order))}  # 0: the head
            rest.sort(key=lambda x: pos[x[0]])
        now, prune_ms = self.prune_clock()
        t = self._prune_time[cid]
        out: list[tuple[int, int]] = []
        left = limit
        while rest and (left is None or left > 0):
            at = 0
            if (now - t) * 1000 >= prune_ms:  # !time_before(jiffies, chain_prune_time + ...)
                t = now
                best = rest[0][1]
                for i, (_, n) in enumerate(rest):
                    if n > best:  # strictly fuller: the first in list order among equals
                        at, best = i, n
            nid, n = rest.pop(at)
            out.append((nid, max_page_sharing - n))
            if left is not None:
                left -= max_page_sharing - n
        return out

    def looked_up(self, ref: int, lo: int, hi: int, max_page_sharing: int, lookups: int) -> list[tuple[int, int]]:
        """Apply `lookups` (>= 1) stable_tree_search() calls at this moment to the index
        entry `ref` of this content, each followed by a mapping of the dup it found (if
        any): on a chain, the dups go to the head of its list as stable_node_dup() moves
        them and chain_prune_time is reset if a lookup pruned.  Returns the dups filled,
        with their room before, in order (the last may take fewer than its room)."""
        if ref > -2:
            return []
        cid = -ref - 2
        now, prune_ms = self.prune_clock()
        fills = self._chain_rooms(cid, lo, hi, max_page_sharing, limit=lookups)
        order = self.chains[cid]
        for nid, room in fills:
            # found != hlist.first && __is_page_sharing_candidate(found, 1)
            if room >= 2 and next(reversed(order)) != nid:
                del order[nid]
                order[nid] = None
        if (now - self._prune_time[cid]) * 1000 >= prune_ms:
            self._prune_time[cid] = now
        return fills

    def insert(self, lo: int, hi: int) -> int:
        """stable_tree_insert(): a new node with no mapping yet; chains it when a node with
        the same content exists already (they are all full, or search would have found one)."""
        nid = self._alloc()
        self._lo.a[nid] = lo
        self._hi.a[nid] = hi
        self._len.a[nid] = 0
        self._chain.a[nid] = -1
        self.nr_nodes += 1
        ref = self.index.get(lo)
        if ref == -1:
            self.index.put(lo, nid)
        elif ref >= 0:
            # alloc_stable_node_chain(): the existing node becomes the first dup, the new
            # one goes to the head (stable_node_chain_add_dup()); chain_prune_time = jiffies
            cid = self._next_chain
            self._next_chain += 1
            self.chains[cid] = {ref: None, nid: None}
            self._room[cid] = {ref: None, nid: None}
            self._prune_time[cid] = self.prune_clock()[0]
            self._chain.a[ref] = cid
            self._chain.a[nid] = cid
            self.index.put(lo, _chain_ref(cid))
            self.stable_node_chains += 1
            self.stable_node_dups += 2
        else:
            cid = -ref - 2
            if self._singular.pop(cid, None) is not None:
                # chain() in stable_tree_insert() collapses a chain of one dup (6.11+),
                # and the chain made again for the new dup has a new chain_prune_time
                self._prune_time[cid] = self.prune_clock()[0]
            self.chains[cid][nid] = None  # stable_node_chain_add_dup(): at the head
            self._room[cid][nid] = None
            self._chain.a[nid] = cid
            self.stable_node_dups += 1
        return nid

    def insert_many(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """insert() for contents known to have no node yet (no index entry): plain nodes."""
        k = int(lo.shape[0])
        reuse = min(k, len(self._free))
        ids = [self._free.pop() for _ in range(reuse)]
        fresh = np.arange(self._next_id, self._next_id + (k - reuse), dtype=np.int64)
        self._next_id += k - reuse
        nids = np.concatenate([np.array(ids, dtype=np.int64), fresh])
        for col in (self._lo, self._hi, self._len):
            col.ensure(self._next_id)
        self._chain.ensure(self._next_id, -1)
        self._lo.a[nids] = lo
        self._hi.a[nids] = hi
        self._len.a[nids] = 0
        self._chain.a[nids] = -1
        self.index.put_many(normkey(lo), nids)
        self.nr_nodes += k
        return nids

    def append_many(self, nids: np.ndarray, distinct: bool = False) -> int:
        """append() for a mapping of each of `nids` (a node may repeat unless
        `distinct`); returns how many of the mappings are sharing ones (all but a
        node's first)."""
        if nids.shape[0] > 1 and not distinct:
            nodes, counts = np.unique(nids, return_counts=True)
        else:
            nodes, counts = nids, np.ones(nids.shape[0], dtype=np.int64)
        before = self._len.a[nodes]
        self._len.a[nodes] = before + counts
        first = int(np.count_nonzero(before == 0))
        self.pages_shared += first
        self.pages_sharing += int(nids.shape[0]) - first
        return int(nids.shape[0]) - first

    def _alloc(self) -> int:
        if self._free:
            return self._free.pop()
        nid = self._next_id
        self._next_id += 1
        for col in (self._lo, self._hi, self._len):
            col.ensure(nid + 1)
        self._chain.ensure(nid + 1, -1)
        return nid

    # -- mappings -----------------------------------------------------------------

    def append(self, nid: int) -> bool:
        """stable_tree_append(): one more mapping; True when it is a *sharing* one."""
        n = int(self._len.a[nid])
        self._len.a[nid] = n + 1
        if n:
            self.pages_sharing += 1
            return True
        self.pages_shared += 1
        return False

    def remove(self, nid: int) -> bool:
        """remove_rmap_item_from_tree() on a stable item: one mapping less.  The KSM page
        (and its node) goes when nothing maps it.  True when a *sharing* mapping went."""
        n = int(self._len.a[nid]) - 1
        self._len.a[nid] = n
        if n:
            cid = int(self._chain.a[nid])
            if cid >= 0:
                self._room[cid][nid] = None  # room again
            self.pages_sharing -= 1
            return True
        self.pages_shared -= 1
        self._free_node(nid)
        return False

    def _free_node(self, nid: int) -> None:
        lo = int(self._lo.a[nid])
        cid = int(self._chain.a[nid])
        if cid < 0:
            self.index.delete(lo, nid)
        else:
            dups = self.chains[cid]
            del dups[nid]
            self._room[cid].pop(nid, None)
            self.stable_node_dups -= 1
            if len(dups) == 1:
                self._singular[cid] = self.at
            elif not dups:
                # stable_node_dup() finds no dup: free_stable_node_chain()
                del self._singular[cid]
                del self.chains[cid]
                del self._room[cid]
                del self._prune_time[cid]
                self.index.delete(lo, _chain_ref(cid))
                self.stable_node_chains -= 1
        self._chain.a[nid] = -1
        self._len.a[nid] = 0
        self.nr_nodes -= 1
        self._free.append(nid)

    def _collapse(self, cid: int) -> None:
        """stable_node_dup() finds the chain's dup alone: rb_replace_node() puts the dup
        in the chain's place, ksm_stable_node_chains--, ksm_stable_node_dups--."""
        (nid,) = self.chains.pop(cid)
        del self._room[cid]
        del self._prune_time[cid]
        del self._singular[cid]
        self._chain.a[nid] = -1
        self.index.put(int(self._lo.a[nid]), nid)
        self.stable_node_chains -= 1
        self.stable_node_dups -= 1

    @property
    def singular(self) -> int:
        """Chains left with a single dup, not collapsed yet."""
        return len(self._singular)

    def walked(self, upto: int | None = None) -> int:
        """A walk of the stable tree (mainline's stable_tree_search() or
        stable_tree_insert()) at scan position `upto` of the chunk being scanned (None:
        after every removal so far): every chain left with a single dup at or before it
        collapses (stable_node_dup(), 6.11+: hlist_is_singular_node(), whether the dup
        is full or not).  A removal at position 2i is page i's own (it precedes the
        page's walk, 2i + 1), -1 is before the chunk.  Returns how many collapsed."""
        done = [cid for cid, at in self._singular.items() if upto is None or at <= upto]
        for cid in done:
            self._collapse(cid)
        return len(done)

    def chunk_done(self, last_walk: int | None) -> None:
        """The end of a chunk: its last walk (None: none) collapses what it reaches
        (walked()), and the chains still left with one dup were left so before the
        next chunk (position -1)."""
        if last_walk is not None:
            self.walked(last_walk)
        for cid in self._singular:
            self._singular[cid] = -1

    def prune_chains(self, max_page_sharing: int) -> None:
        """Linux 5.4's stable_node_dup() (LKSM's base) with prune: a chain left with a
        single dup collapses back into a plain stable node (every
        stable_node_chains_prune_millisecs) - only when that dup still has room
        (is_page_sharing_candidate()): a full dup stays chained.  Mainline collapses at
        walks instead (walked())."""
        nlen = self._len.a
        for cid in [c for c in self._singular if int(nlen[next(iter(self.chains[c]))]) < max_page_sharing]:
            self._collapse(cid)

    def clear(self) -> None:
        self.__init__(self.prune_clock)  # type: ignore[misc]
