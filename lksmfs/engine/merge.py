"""cmp_and_merge_page() and friends: what a scanned page does to the trees.

mm/ksm.c decides each page's fate one page at a time: join a KSM page with the same
content (stable_tree_search + try_to_merge_with_ksm_page), or - past the checksum gate -
merge with an identical page waiting in the unstable tree (unstable_tree_search_insert +
try_to_merge_two_pages + stable_tree_insert), or wait in the unstable tree itself.

Here a chunk of up to CHUNK pages is settled at once wherever the outcome of a page does
not depend on another page of the same chunk (numpy over the chunk); what does (pages
sharing a content inside the chunk, broken merges, chains, full nodes, zero pages) goes
through the page-at-a-time `cmp_and_merge_page()`, in address order.  Either way the
bookkeeping of a merge is one function, `_append()`: ksm.c's stable_tree_append().

Shadow mode: a KSM page is the 96-bit digest of the content its first two pages had
when they were compared byte for byte; a page joins it when its digest is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import lksmfs.engine.thp as thp
from lksmfs.engine.context import MergerCtx
from lksmfs.engine.hashindex import normkey
from lksmfs.engine.pages import Chunk, as_words
from lksmfs.engine.rmap import (
    GONE,
    NOT_TREE,
    SEQNR_MASK,
    STABLE,
    UNSTABLE,
    Rmap,
    calc_checksum,
    checksum_changed,
)
from lksmfs.engine.slot import MmSlot
from lksmfs.sources.base import PAGE_SIZE, AccessDenied, ProcessGone

PARTNER_BATCH = 64  # partner pages read and compared at a time (256 KiB of buffer)
PAIR_BATCH = 64  # pages of a chunk read at once to compare new KSM pages' two pages

SourceError = (ProcessGone, AccessDenied)


class Merger:
    """The merge half of ksmd, over the engine's trees and counters."""

    def __init__(self, ksm: MergerCtx, grouped: bool = True) -> None:
        self.k = ksm
        self.grouped = grouped  # False: every page through cmp_and_merge_page(), one by one
        self._partners = bytearray()  # partner pages are read here, never over a chunk
        # the items of the chunk being scanned (set by the scanner): where a stable item
        # of it leaves its KSM page is its scan position (StableTree.walked())
        self.chunk: Rmap | None = None

    def release_buffers(self) -> None:
        """A scan ended: the partner buffer goes back until the next one."""
        self._partners = bytearray()

    def read_partners(self, slot: MmSlot, vpns: np.ndarray) -> np.ndarray:
        """get_mergeable_page(): the current contents of unstable tree partners, as rows of
        words for memcmp_pages(), read into the merger's own buffer (the chunk being
        merged stays where the scanner read it)."""
        need = int(vpns.shape[0]) * PAGE_SIZE
        if len(self._partners) < need:
            self._partners = bytearray(max(need, 2 * len(self._partners)))
        return as_words(self.k.source.read_pages(slot.task, vpns, memoryview(self._partners)[:need]))

    def may_merge(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Which of these pages, scanned now in this order, could become part of a KSM
        page (stable_tree_append()): those whose content has a KSM page or an unstable
        tree item, or is another of them too.  A superset (a digest match is not a byte
        match); the zero page is no KSM page (no stable_tree_append())."""
        k = self.k
        key = normkey(lo)
        m: np.ndarray = (k.stable.index.get_many(key) != -1) | (k.unstable.get_many(key) != -1)  # -1: no entry
        if key.shape[0] > 1:
            _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
            m |= cnt[inv] > 1
        return m

    # -- the one bookkeeping path of a merge ------------------------------------------

    def _append(
        self, blk: Rmap, ti: np.ndarray, nids: np.ndarray, c: Chunk | None, *, distinct: bool = False
    ) -> None:
        """stable_tree_append() (+ LKSM_FILTER's stable_tree_append_region()) for items
        `ti` of `blk` joining the KSM pages `nids` (`distinct` when no node repeats): out
        of the unstable tree if they were in it, mapped by their node, counted as shared
        or sharing (sharing ones are merges for LKSM's statistics), and recorded in
        their region - the chunk's (ksm_scan.region) for pages of chunk `c`, the one the
        item holds (rmap_item->region) for a partner from the unstable tree."""
        k = self.k
        # out of the unstable tree first (try_to_merge_with_ksm_page() does it for the
        # tree's item; cmp_and_merge_page() did it for the page scanned)
        self.remove_from_tree(blk, ti)
        blk.flags[ti] |= STABLE
        blk.node[ti] = nids
        k.stats.merged(k.stable.append_many(nids, distinct=distinct))
        if k.filter_enabled:
            if c is not None:
                k.regions.account_merges(c.rid[ti].astype(np.int64), c.offsets(ti))
            else:
                k.regions.account_merges(blk.region[ti].astype(np.int64), blk.off[ti].astype(np.int64))

    def remove_from_tree(self, blk: Rmap, idx: np.ndarray, at: np.ndarray | None = None) -> None:
        """remove_rmap_item_from_tree() for items `idx` of `blk`: a stable one leaves its
        KSM page (a broken merge), an unstable one stops counting as unshared
        (ksm_pages_unshared--); both keep their item.  The one place either happens.
        `at`: the scan positions of the removals (StableTree.walked()); by default an
        item of the chunk being scanned is at 2 * its index, any other before it."""
        k = self.k
        flags = blk.flags[idx]
        stable = (flags & STABLE) != 0
        if stable.any():
            st = k.stable
            if at is not None:
                pos = at[stable].tolist()
            elif blk is self.chunk:
                pos = (2 * idx[stable]).tolist()
            else:
                pos = [-1] * int(np.count_nonzero(stable))
            for nid, p in zip(blk.node[idx[stable]].tolist(), pos, strict=True):
                st.at = p
                if st.remove(nid):
                    k.stats.broken()
            st.at = -1
            blk.node[idx[stable]] = -1
        k.stats.pages_unshared -= int(np.count_nonzero(flags & UNSTABLE))
        blk.flags[idx] = flags & NOT_TREE

    def remove_items(self, rm: Rmap, at: np.ndarray | None = None) -> None:
        """remove_rmap_item_from_tree() + free_rmap_item() for a block of items that is
        dropped (`rm` is not used afterwards; `at`: their scan positions, see
        remove_from_tree())."""
        n = len(rm)
        if not n:
            return
        freed = n - int(np.count_nonzero(rm.flags & GONE))  # GONE: freed already
        self.remove_from_tree(rm, np.arange(n), at)
        self.k.stats.rmap_items -= freed

    def unstable_insert(self, blk: Rmap, i: np.ndarray, lo: np.ndarray, refs: np.ndarray,
                        stale: bool = False) -> None:
        """The insert of unstable_tree_search_insert(): items `i` of `blk` (pages with
        digests `lo`, numbered `refs` in the tree) wait in this round's unstable tree,
        each the first of its content; `stale` when an entry for the content may exist
        (a partner gone or moved on), which the new one replaces."""
        k = self.k
        blk.flags[i] |= UNSTABLE
        blk.seq[i] = k.scanner.scan_round & SEQNR_MASK
        if stale:
            for key, ref in zip(lo.tolist(), refs.tolist(), strict=True):
                k.unstable.put(key, ref)
        else:
            k.unstable.put_many(normkey(lo), refs)
        k.stats.pages_unshared += int(i.shape[0])

    # -- a chunk ----------------------------------------------------------------------

    def cmp_and_merge(self, c: Chunk, idx: np.ndarray) -> None:
        """cmp_and_merge_page() for the pages `idx` of a chunk (those that are not
        unchanged KSM pages), with the outcome the page-at-a-time path gives.

        A page's outcome depends on other pages only through content it shares with
        them, so the chunk is settled content by content:
        - a content found once in the chunk, with no KSM page or one plain KSM page with
          room, is settled vectorised with all such pages (join, checksum gate, merge
          with an unstable tree partner, or insert);
        - a content found several times (or with a chain, a full KSM page, the zero
          page) is settled as a group: one question to the trees, one byte comparison
          of the pages with each other and with the partner, then bulk updates;
        - what depends on the order of pages of different contents - a broken merge
          freeing room, an item already in this round's tree - goes page by page, in
          address order, as does a group whose bytes do not all agree.
        """
        if not self.grouped:
            self._one_by_one(c, idx)
            return
        if c.slot.thp_blocks.size:
            self._by_huge_page(c, idx)
            return
        self._settle(c, idx)

    def _settle(self, c: Chunk, idx: np.ndarray) -> None:
        """cmp_and_merge() for pages no THP split can touch."""
        if not idx.size:
            return
        k = self.k
        part = c.part
        flags = part.flags
        lo, hi = c.lo, c.hi
        klo = normkey(lo[idx])
        all_idx = idx
        # the groups: pages of equal content, contiguous in `order`, address order within
        order = np.argsort(klo, kind="stable")
        sk = klo[order]
        edge = np.empty(sk.shape[0], dtype=bool)
        edge[0] = True
        np.not_equal(sk[1:], sk[:-1], out=edge[1:])
        starts = np.flatnonzero(edge)
        counts = np.diff(starts, append=sk.shape[0])
        gid = np.empty(idx.shape[0], dtype=np.int64)
        gid[order] = np.repeat(np.arange(starts.shape[0]), counts)
        size = counts[gid]
        cur_seq = k.scanner.scan_round & SEQNR_MASK
        fl = flags[idx]
        old_stable = (fl & STABLE) != 0  # a broken merge: it leaves its KSM page first
        slow_page = old_stable | (((fl & UNSTABLE) != 0) & (part.seq[idx] == cur_seq))
        if old_stable.any():  # ... which frees room for the contents of those pages
            slow_page |= np.isin(klo, normkey(k.stable.lo[part.node[idx[old_stable]]]))
        sref = k.stable.index.get_many(klo)
        gslow = np.zeros(starts.shape[0], dtype=bool)
        gslow[gid[slow_page]] = True
        slow = gslow[gid]

        if k.crawler.checksum_gate(k.scanner.scan_round):
            # A content with no KSM page whose every page fails the checksum gate makes
            # nothing (the first visit of every page, mostly): they leave last round's
            # tree and record their checksum, all at once.
            changed, ck = checksum_changed(part, idx, hi[idx])
            fails = changed & (sref == -1) & ~slow
            gquiet = np.ones(starts.shape[0], dtype=bool)
            gquiet[gid[~fails]] = False
            quiet = gquiet[gid]
            if quiet.any():
                q = idx[quiet]
                self.remove_from_tree(part, q)
                part.cksum[q] = ck[quiet]
                if quiet.all():
                    return
                keep = ~quiet  # the others go on; whole groups were settled
                idx, klo, sref, size, slow, fl = idx[keep], klo[keep], sref[keep], size[keep], slow[keep], fl[keep]
                gid = gid[keep]
        # one content, once: vectorised where the trees hold no KSM page or a plain one
        single = (size == 1) & ~slow
        sn = np.where(sref >= 0, sref, 0)
        plain_room = (
            (sref >= 0) & (k.stable.lo[sn] == lo[idx]) & (k.stable.hi[sn] == hi[idx])
            & (k.stable.nlen[sn] < k.tunables.max_page_sharing)
        )
        simple = single & ((sref == -1) | plain_room)
        if k.tunables.use_zero_pages:
            simple &= ~k.digest.is_zero(lo[idx], hi[idx])
        grouped = ~slow & ~simple
        fallback: list[np.ndarray] = []
        if simple.any():
            fallback.append(self._settle_singles(c, idx[simple], sref[simple], plain_room[simple]))
        if grouped.any():
            gs = np.flatnonzero(np.bincount(gid[grouped], minlength=starts.shape[0]))
            gs = self._join_rooms(c, all_idx[order], starts[gs], counts[gs], gs)
            fallback += self._settle_groups(c, [all_idx[order[starts[g] : starts[g] + counts[g]]] for g in gs.tolist()])
        rest = [idx[slow], *fallback]
        s = np.sort(np.concatenate(rest)) if len(rest) > 1 else rest[0]
        self._one_by_one(c, s)

    def _join_rooms(self, c: Chunk, sorted_idx: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                    gs: np.ndarray) -> np.ndarray:
        """The groups `gs` (pages of one content: `sorted_idx[starts[j]:starts[j] +
        counts[j]]`, address order) whose every page finds room in the KSM pages of its
        content - stable_tree_search() then try_to_merge_with_ksm_page(), page after
        page, in stable_node_dup()'s order - settled together: one removal from the trees and
        one stable_tree_append() for all of them.  Returns the groups left for
        _settle_groups() (those with no or too little room, or whose digests differ)."""
        k = self.k
        n = int(gs.shape[0])
        total = int(counts.sum())
        owner = np.repeat(np.arange(n), counts)
        first_at = np.cumsum(counts) - counts
        members = sorted_idx[np.arange(total) - np.repeat(first_at, counts) + np.repeat(starts, counts)]
        first = members[first_at]
        lo, hi = c.lo, c.hi
        flo, fhi = lo[first], hi[first]
        ok = np.ones(n, dtype=bool)
        ok[owner[(lo[members] != flo[owner]) | (hi[members] != fhi[owner])]] = False  # keys alike, digests not
        st = k.stable
        sref = st.index.get_many(normkey(flo))
        ok &= sref != -1
        if not ok.any():
            return gs
        mps = k.tunables.max_page_sharing
        nid = np.full(total, -1, dtype=np.int64)  # the KSM page each page joins
        # a plain KSM page (no chain) with the content and room for the whole group
        sn = np.where(sref >= 0, sref, 0)
        plain = ok & (sref >= 0)
        fits = plain & (st.lo[sn] == flo) & (st.hi[sn] == fhi) & (mps - st.nlen[sn] >= counts)
        ok &= ~plain | fits
        to = np.where(fits, sref, -1)  # the one KSM page a whole group joins
        # a chain whose one dup with room takes the whole group
        chain = np.flatnonzero(ok & (sref < -1))
        dup = st.chain_candidates(sref[chain])
        dn = np.maximum(dup, 0)
        one = (dup >= 0) & (st.lo[dn] == flo[chain]) & (st.hi[dn] == fhi[chain]) & (mps - st.nlen[dn] >= counts[chain])
        to[chain[one]] = dup[one]
        whole = to[owner] >= 0
        nid[whole] = to[owner[whole]]
        for j in chain[one].tolist():  # the lookups' effects on the chain's list
            st.looked_up(int(sref[j]), int(flo[j]), int(fhi[j]), mps, int(counts[j]))
        # other chains: their dups with room, as stable_node_dup() fills them
        for j in chain[~one].tolist():
            want = int(counts[j])
            rooms = st.rooms_at(int(sref[j]), int(flo[j]), int(fhi[j]), mps)
            if sum(room for _, room in rooms) < want:
                ok[j] = False
                continue
            rooms = st.looked_up(int(sref[j]), int(flo[j]), int(fhi[j]), mps, want)
            at = int(first_at[j])
            for node, room in rooms:
                t = min(room, want)
                nid[at : at + t] = node
                at += t
                want -= t
                if not want:
                    break
        if ok.any():
            joins = ok[owner]
            self._append(c.part, members[joins], nid[joins], c)
        out: np.ndarray = gs[~ok]
        return out

    def _by_huge_page(self, c: Chunk, idx: np.ndarray) -> None:
        """cmp_and_merge() for a chunk with pages in THPs no merge has split
        (lksmfs.engine.thp), in address order: the pages of such a THP where some page
        may merge now (its content has a KSM page, an unstable tree item, or another page
        of the chunk, or is the zero page's with use_zero_pages) go one at a time until
        the THP is split - which takes its zero-filled pages away - and the rest of it as
        usual; the pages between such THPs as usual too."""
        k = self.k
        slot = c.slot
        vpns = c.part.vpn[idx]
        inthp = thp.in_unsplit(slot, vpns)
        if not inthp.any():
            self._settle(c, idx)
            return
        klo = normkey(c.lo[idx])
        _, inv, cnt = np.unique(klo, return_inverse=True, return_counts=True)
        may = (cnt[inv] > 1) | (k.unstable.get_many(klo) != -1)
        if k.tunables.use_zero_pages:  # a merge with the zero page splits the THP too
            may |= k.digest.is_zero(c.lo[idx], c.hi[idx])
        if k.crawler.checksum_gate(k.scanner.scan_round):  # a page failing it tries no merge
            may &= ~checksum_changed(c.part, idx, c.hi[idx])[0]
        may |= k.stable.index.get_many(klo) != -1  # (stable_tree_search() comes first)
        blocks = thp.blocks_of(vpns)
        busy = inthp & np.isin(blocks, blocks[inthp & may])
        if not busy.any():
            self._settle(c, idx)
            return
        # runs of pages: the pages of one busy THP, or the pages between two; what goes
        # as usual is settled at once up to the next busy THP
        key = np.where(busy, blocks, -1)
        edges = np.flatnonzero(np.diff(key) != 0) + 1
        usual: list[np.ndarray] = []

        def settle_usual() -> None:
            if usual:
                self._settle(c, self._visited(c, np.concatenate(usual) if len(usual) > 1 else usual[0]))
                usual.clear()

        for seg in np.split(np.arange(idx.shape[0]), edges):
            part = idx[seg]
            if key[seg[0]] < 0:
                usual.append(part)
                continue
            settle_usual()
            for j, i in enumerate(part.tolist()):
                if not thp.is_unsplit(slot, int(c.part.vpn[i])):
                    usual.append(part[j:])  # split: the rest as usual
                    break
                self._visit(c, i)
        settle_usual()

    def _visited(self, c: Chunk, idx: np.ndarray) -> np.ndarray:
        """The pages of `idx` the scanner still visits: those a THP split during this scan
        gave the zero page are not (their items leave the trees, and the list at the
        slot's next scan)."""
        if not c.slot.thp_zero.size:
            return idx
        gone = thp.vanished(c.slot, c.part.vpn[idx])
        for i in idx[gone].tolist():
            self._gone(c, i)
        out: np.ndarray = idx[~gone]
        return out

    def _settle_singles(self, c: Chunk, i: np.ndarray, sref: np.ndarray, plain_room: np.ndarray) -> np.ndarray:
        """Pages whose content no other page of the chunk has, and which find no KSM page
        or a plain one with room: joining it (J), the checksum gate, merging with their
        unstable tree partner after a byte comparison (M), or entering the unstable
        tree.  Returns the pages left for the page-at-a-time path (a partner that was
        gone or no longer equal)."""
        k = self.k
        part = c.part
        lo, hi = c.lo, c.hi
        if plain_room.any():  # J: stable_tree_search() finds a plain node with room
            j = i[plain_room]
            self._append(part, j, sref[plain_room], c, distinct=True)
            i = i[~plain_room]
        left = i[:0]
        if not i.size:
            return left
        # remove_rmap_item_from_tree() for items left in last round's unstable tree
        self.remove_from_tree(part, i)
        # the checksum gate (the policy says in which rounds; never for frozen tasks)
        if k.crawler.checksum_gate(k.scanner.scan_round):
            fail, new_ck = checksum_changed(part, i, hi[i])
            part.cksum[i[fail]] = new_ck[fail]
            i = i[~fail]
        # M: unstable_tree_search_insert() finds a partner; merged after memcmp
        uref = k.unstable.get_many(normkey(lo[i]))
        cand = uref >= 0
        if cand.any():
            merged = self._merge_with_tree(c, i[cand], uref[cand])
            left = i[cand][~merged]
            i = i[~cand]
        if i.size:
            self._insert_unstable(c, i)
        return left

    def _insert_unstable(self, c: Chunk, i: np.ndarray, stale: bool = False) -> None:
        """unstable_tree_search_insert() found nothing: the pages wait in the tree, each
        the first of its content; `stale` when an entry for it may exist (a partner
        that has gone or moved on), which the new one replaces."""
        part = c.part
        if part.tracks_regions:
            part.region[i] = c.rid[i]
            part.off[i] = c.offsets(i).astype(np.uint32)
        self.unstable_insert(part, i, c.lo[i], i.astype(np.int64) + c.at, stale)

    def _settle_groups(self, c: Chunk, groups: list[np.ndarray]) -> list[np.ndarray]:
        """cmp_and_merge_page() for the pages of each group (one content each, address
        order), as the page-at-a-time path would settle them one after the other: fill
        the KSM pages with room (in stable_node_dup()'s order), then - past the checksum
        gate - merge with the unstable tree partner, fill that new KSM page up to max_page_sharing,
        pair the next two pages into another, and so on; a last page alone waits in the
        tree.  Groups of different contents do not meet, so every group is planned first;
        then the pages that become one KSM page are compared byte for byte (a page with
        the partner, or the two pages of a new pair), as try_to_merge_two_pages() would,
        the chunk's pages read together, a bounded batch at a time; only then does a
        group change anything.  Returns the groups left to the page-at-a-time path,
        unchanged: a comparison failed (a digest collision, a page rewritten since it
        was read), or the digests or a THP say so."""
        fallback: list[np.ndarray] = []
        planned: list[tuple[np.ndarray, int, list[int], _GroupPlan | None]] = []
        for m in groups:
            got = self._plan_group(c, m)
            if got is None:
                fallback.append(m)
            else:
                planned.append((m, *got))
        b = 0
        while b < len(planned):
            # the next plans whose pages to compare fit in one read of PAIR_BATCH pages
            e, wanted = b, 0
            while e < len(planned):
                plan = planned[e][3]
                n = plan.npages() if plan is not None else 0
                if e > b and wanted + n > PAIR_BATCH:
                    break
                wanted += n
                e += 1
            needs = [p.needs() for _, _, _, p in planned[b:e] if p is not None and p.pairs]
            need = np.unique(np.concatenate(needs)) if needs else np.zeros(0, dtype=np.int64)
            rows = c.words(need) if need.size else np.zeros((0, PAGE_SIZE // 8), dtype=np.uint64)
            good = []
            for item in planned[b:e]:
                if item[3] is not None and not item[3].compared(self, need, rows):
                    fallback.append(item[0])
                else:
                    good.append(item)
            b = e
            if not good:
                continue
            # remove_rmap_item_from_tree() for items left in last round's unstable tree
            self.remove_from_tree(c.part, np.concatenate([m for m, _, _, _ in good]))
            pages: list[np.ndarray] = []
            nodes: list[np.ndarray] = []
            for m, taken, nids, plan in good:
                # every page of the group looked its content up (stable_tree_search())
                st = self.k.stable
                lo0, hi0 = int(c.lo[m[0]]), int(c.hi[m[0]])
                st.looked_up(st.index.get(lo0), lo0, hi0, self.k.tunables.max_page_sharing, int(m.shape[0]))
                if taken:
                    pages.append(m[:taken])
                    nodes.append(np.array(nids, dtype=np.int64))
                if plan is not None:
                    joined, new = plan.apply(self)
                    pages.append(joined)
                    nodes.append(new)
            # stable_tree_append() for every page of these groups that joined a KSM page
            self._append(c.part, np.concatenate(pages), np.concatenate(nodes), c)
        return fallback

    def _plan_group(self, c: Chunk, m: np.ndarray) -> tuple[int, list[int], _GroupPlan | None] | None:
        """The outcome of one group, with nothing changed: how many pages the KSM pages
        with room take (stable_tree_search()) and which, and the plan for the rest; None
        when the page-at-a-time path must settle it."""
        k = self.k
        first = int(m[0])
        lo, hi = int(c.lo[first]), int(c.hi[first])
        if not (bool((c.lo[m] == c.lo[first]).all()) and bool((c.hi[m] == c.hi[first]).all())):
            return None  # keys alike, digests not: the page-at-a-time path sorts them out
        taken = 0
        nids: list[int] = []
        for nid, room in k.stable.rooms(lo, hi, k.tunables.max_page_sharing):
            n = min(room, m.shape[0] - taken)
            nids += [nid] * n
            taken += n
            if taken == m.shape[0]:
                break
        rest = m[taken:]
        plan = _GroupPlan.make(self, c, rest) if rest.size else None
        if plan is not None and plan.partner is not None:
            tslot, tblk, ti = plan.partner
            tvpn = int(tblk.vpn[ti])
            if thp.is_unsplit(tslot, tvpn) or thp.is_vanished(tslot, tvpn):
                return None  # lksmfs.engine.thp: page by page
        return taken, nids, plan

    def _merge_with_tree(self, c: Chunk, m: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """try_to_merge_two_pages() + stable_tree_insert() for pages whose unstable tree
        partner is still there and still byte-for-byte equal.  Returns which merged."""
        k = self.k
        cur_seq = k.scanner.scan_round & SEQNR_MASK
        n = int(m.shape[0])
        ok = np.zeros(n, dtype=bool)
        tblock = np.full(n, -1, dtype=np.int64)
        tidx = np.full(n, -1, dtype=np.int64)
        tvpns = np.zeros(n, dtype=np.uint64)
        blocks: list[Rmap] = []
        visits, tpos = k.unstable.where_many(refs)
        for v in np.unique(visits).tolist():
            sel = np.flatnonzero(visits == v)
            tslot = k.unstable.visit_slot(v)
            if tslot is None or k.mm.by_sid(tslot.sid) is not tslot:
                continue  # visited again since, or left
            blk = k.scanner.current_items() if tslot is c.slot else tslot.rmap
            if len(blk):
                pos = tpos[sel]
                posc = np.minimum(pos, len(blk) - 1)
                live = (pos < len(blk)) & ((blk.flags[posc] & UNSTABLE) != 0) & (blk.seq[posc] == cur_seq)
                if tslot.thp_blocks.size or tslot.thp_zero.size:  # lksmfs.engine.thp: page by page
                    pv = blk.vpn[posc]
                    live &= ~thp.in_unsplit(tslot, pv) & ~thp.vanished(tslot, pv)
                blocks.append(blk)
                tblock[sel[live]] = len(blocks) - 1
                tidx[sel[live]] = posc[live]
                tvpns[sel[live]] = blk.vpn[posc[live]]
            got = sel[tblock[sel] >= 0]
            if not got.size:
                continue
            # get_mergeable_page() + memcmp_pages(), a few reads for this partner process
            order = np.argsort(tvpns[got], kind="stable")
            got = got[order]
            for b in range(0, got.shape[0], PARTNER_BATCH):
                g = got[b : b + PARTNER_BATCH]
                try:
                    theirs = self.read_partners(tslot, tvpns[g])
                except SourceError:
                    break
                ok[g] = (theirs == c.words(m[g])).all(axis=1)
        if not ok.any():
            return ok
        w = m[ok]
        nids = k.stable.insert_many(c.lo[w], c.hi[w])
        # the partners leave the unstable tree for the new KSM pages ...
        for b in np.unique(tblock[ok]).tolist():
            sel = ok & (tblock == b)
            blk = blocks[b]
            ti = tidx[sel]
            self._append(blk, ti, nids[sel[ok]], None, distinct=True)
        # ... and this page joins each
        self._append(c.part, w, nids, c, distinct=True)
        return ok

    # -- one page at a time -----------------------------------------------------------

    def _one_by_one(self, c: Chunk, s: np.ndarray) -> None:
        if not s.size:
            return
        for i in s.tolist():
            self._visit(c, i)

    def _visit(self, c: Chunk, i: int) -> None:
        """cmp_and_merge_page() for page `i`, unless a THP split during this scan gave it
        the zero page: then it is not visited at all."""
        if thp.is_vanished(c.slot, int(c.part.vpn[i])):
            self._gone(c, i)
        else:
            self.cmp_and_merge_page(c, i)

    def _gone(self, c: Chunk, i: int) -> None:
        """A page of the chunk a THP split took away is not visited after all: its item
        is freed, as the kernel's scanner frees it when it passes the address, and
        leaves the list at the slot's next scan (marked GONE until then)."""
        part = c.part
        self.remove_items(part.take(np.array([i])), np.array([2 * i]))
        part.flags[i] = GONE
        part.node[i] = -1
        self.k.stats.pages_scanned -= 1
        c.slot.nr_scans -= 1

    def cmp_and_merge_page(self, c: Chunk, i: int) -> None:
        """cmp_and_merge_page() for page `i` of the chunk (mm/lksm.c)."""
        k = self.k
        part = c.part
        lo, hi = int(c.lo[i]), int(c.hi[i])
        vpn = int(part.vpn[i])
        at = np.array([i])
        # stable_tree_search()
        kn = k.stable.search(lo, hi, k.tunables.max_page_sharing)
        self.remove_from_tree(part, at)
        if kn >= 0:
            # try_to_merge_with_ksm_page(): the KSM page's content is its digest
            if not thp.merge_fails(k, c.slot, vpn, self._known(c)):
                self._append(part, at, np.array([kn]), c, distinct=True)
            return
        # the checksum gate (the policy says in which rounds; never for frozen tasks)
        if k.crawler.checksum_gate(k.scanner.scan_round):
            changed, ck = checksum_changed(part, at, c.hi[at])
            if changed[0]:
                part.cksum[i] = ck[0]
                return
        page = c.words(np.array([i])).tobytes()
        if (k.tunables.use_zero_pages and lo == k.digest.zero_lo and hi == k.digest.zero_hi and not any(page)
                and not thp.merge_fails(k, c.slot, vpn, self._known(c))):  # failed: "not really empty", go on
            # merged with the zero page: no longer anonymous until written again
            k.scanner.add_zero_pages(np.array([vpn], dtype=np.uint64))
            k.stats.ksm_zero_pages += 1
            return
        # unstable_tree_search_insert()
        key = lo if lo >= 2 else lo + 2
        ref = k.unstable.get(key)
        tree = self._tree_item(ref, c.slot, c.at + i) if ref >= 0 else None
        if tree is not None:
            tslot, tblk, ti = tree
            tvpn = int(tblk.vpn[ti])
            if thp.is_vanished(tslot, tvpn):
                return  # get_mergeable_page() finds no anonymous page: the search ends, no insert
            tpage = self._read_page(tslot, tvpn)
            if tpage is not None and tpage == page:
                if self._thp_pair_fails(c, vpn, tslot, tblk, tvpn):
                    return
                # try_to_merge_two_pages() + stable_tree_insert()
                nid = np.array([k.stable.insert(lo, hi)])
                k.unstable.delete(key, ref)
                tat = np.array([ti])
                self._append(tblk, tat, nid, None, distinct=True)
                self._append(part, at, nid, c, distinct=True)
                return
        # insert into the unstable tree (over any stale entry with this content)
        self._insert_unstable(c, at, stale=True)

    def _thp_pair_fails(self, c: Chunk, vpn: int, tslot: MmSlot, tblk: Rmap, tvpn: int) -> bool:
        """try_to_merge_two_pages() as far as THPs go (lksmfs.engine.thp): the page's THP
        is split, then its partner's; the merge fails if either page is now the zero
        page.  Two pages of one THP do not merge at all: each holds the THP, so its split
        fails, and cmp_and_merge_page() splits it afterwards."""
        k = self.k
        slot = c.slot
        if tslot is slot and vpn >> thp.HPAGE_PMD_ORDER == tvpn >> thp.HPAGE_PMD_ORDER and \
                thp.is_unsplit(slot, vpn):
            thp.split(k, slot, vpn >> thp.HPAGE_PMD_ORDER, self._known(c))
            return True
        theirs = [(tblk.vpn, tblk.dlo, tblk.dhi.astype(np.uint64))] if tblk.tracks_digests else []
        return thp.merge_fails(k, slot, vpn, self._known(c)) or thp.merge_fails(k, tslot, tvpn, theirs)

    def _known(self, c: Chunk) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Digests of this scan for the slot being scanned (a THP split reads only the
        rest): those of its items so far, this chunk's included, where items keep
        digests; else the chunk's."""
        cur = self.k.scanner.current_items()
        if cur.tracks_digests:
            return [(cur.vpn, cur.dlo, cur.dhi.astype(np.uint64))]
        return [(c.part.vpn, c.lo, c.hi)]

    def _tree_item(self, ref: int, slot: MmSlot, own: int) -> tuple[MmSlot, Rmap, int] | None:
        """Resolve an unstable tree entry to a live item of this round, or None for a
        stale one (its slot left or was visited again, or the item moved on since it
        was inserted) or for the page asking (`own`: its number in the tree)."""
        k = self.k
        if ref == own:
            return None
        got = k.unstable.where(ref)
        if got is None:
            return None
        tslot, ti = got
        if k.mm.by_sid(tslot.sid) is not tslot:
            return None
        b = k.scanner.current_items() if tslot is slot else tslot.rmap
        if ti < len(b) and int(b.flags[ti]) & UNSTABLE and int(b.seq[ti]) == k.scanner.scan_round & SEQNR_MASK:
            return tslot, b, ti
        return None

    def _read_page(self, slot: MmSlot, vpn: int) -> bytes | None:
        """get_mergeable_page() + the bytes for memcmp_pages()."""
        try:
            return self.read_partners(slot, np.array([vpn], dtype=np.uint64)).tobytes()
        except SourceError:
            return None


@dataclass
class _GroupPlan:
    """The fate of the pages of one content that found no KSM page with room, in
    address order: the index of the new KSM page each joins (`dup`, -1 for none), the
    ones the checksum gate fails, the ones that go to the zero page, the one left
    waiting alone in the unstable tree, and the new KSM pages as (first page, second
    page) pairs - the first being -1 for the unstable tree partner found before."""

    c: Chunk
    rest: np.ndarray
    lo: int
    hi: int
    dup: np.ndarray
    fail: np.ndarray
    zero: np.ndarray
    waiting: int
    pairs: list[tuple[int, int]]
    partner: tuple[MmSlot, Rmap, int] | None

    @classmethod
    def make(cls, merger: Merger, c: Chunk, rest: np.ndarray) -> _GroupPlan:
        k = merger.k
        part = c.part
        n = int(rest.shape[0])
        first = int(rest[0])
        lo, hi = int(c.lo[first]), int(c.hi[first])
        if k.crawler.checksum_gate(k.scanner.scan_round):
            passing = ~checksum_changed(part, rest, c.hi[rest])[0]
        else:
            passing = np.ones(n, dtype=bool)
        is_zero = (bool(k.tunables.use_zero_pages) and lo == k.digest.zero_lo and hi == k.digest.zero_hi
                   and not c.words(np.array([first])).any())
        partner = None
        if not is_zero:
            ref = k.unstable.get(lo if lo >= 2 else lo + 2)
            partner = merger._tree_item(ref, c.slot, c.at + first) if ref >= 0 else None
        mps = k.tunables.max_page_sharing
        dup = np.full(n, -1, dtype=np.int64)
        pairs: list[tuple[int, int]] = []
        have_partner = partner is not None
        pos, room, waiting, zero_from = 0, 0, -1, n
        pass_at = np.flatnonzero(passing)
        while pos < n:
            if room:  # the KSM page made last still has room: the next pages join it
                take = min(room, n - pos)
                dup[pos : pos + take] = len(pairs) - 1
                room -= take
                pos += take
                continue
            q = int(np.searchsorted(pass_at, pos))  # the pages up to the next passing one fail
            if q == pass_at.shape[0]:
                break
            pos = int(pass_at[q])
            if is_zero:
                zero_from = pos
                break
            if have_partner or waiting >= 0:
                # try_to_merge_two_pages() + stable_tree_insert(): a new KSM page
                pairs.append((waiting, pos))
                dup[pos] = len(pairs) - 1
                if waiting >= 0:
                    dup[waiting] = len(pairs) - 1
                    waiting = -1
                have_partner = False
                room = mps - 2
            else:
                waiting = pos
            pos += 1
        fail = ~passing & (dup < 0)
        fail[zero_from:] = False
        zero = np.zeros(n, dtype=bool)
        zero[zero_from:] = passing[zero_from:]
        used = partner if pairs and pairs[0][0] < 0 else None
        return cls(c, rest, lo, hi, dup, fail, zero, waiting, pairs, used)

    def needs(self) -> np.ndarray:
        """The chunk's pages memcmp_pages() reads for the new KSM pages."""
        return np.array([self.rest[x] for pair in self.pairs for x in pair if x >= 0], dtype=np.int64)

    def npages(self) -> int:
        """How many of them (at most)."""
        return 2 * len(self.pairs)

    def compared(self, merger: Merger, need: np.ndarray, rows: np.ndarray) -> bool:
        """memcmp_pages() for the two pages of every new KSM page (`rows`: the words of
        the chunk's pages `need`, sorted; the pages of this plan among them)."""
        if not self.pairs:
            return True
        pairs = np.array(self.pairs, dtype=np.int64)
        mine = rows[np.searchsorted(need, self.rest[pairs[:, 1]])]
        two = pairs[:, 0] >= 0
        if two.any():
            theirs = rows[np.searchsorted(need, self.rest[pairs[two, 0]])]
            if not bool((theirs == mine[two]).all()):
                return False
        if not two.all():  # the first pair's partner, from the unstable tree
            assert self.partner is not None
            tslot, tblk, ti = self.partner
            if merger._read_page(tslot, int(tblk.vpn[ti])) != mine[0].tobytes():
                return False
        return True

    def apply(self, merger: Merger) -> tuple[np.ndarray, np.ndarray]:
        """New KSM pages (their partner first), checksums of the pages the gate failed,
        zero pages, and the page left waiting; returns the chunk's pages that join the
        new KSM pages, and which, for the caller's one stable_tree_append() (the
        counters add up the same in any order: a page joining a node first is shared,
        every other sharing)."""
        k = merger.k
        c, rest = self.c, self.rest
        part = c.part
        new = np.array([k.stable.insert(self.lo, self.hi) for _ in self.pairs], dtype=np.int64)
        if self.partner is not None:
            _, tblk, ti = self.partner
            tat = np.array([ti])
            merger._append(tblk, tat, new[:1], None, distinct=True)
        joined = self.dup >= 0
        if self.fail.any():
            f = rest[self.fail]
            part.cksum[f] = calc_checksum(c.hi[f])
        if self.zero.any():
            z = rest[self.zero]
            k.scanner.add_zero_pages(part.vpn[z])
            k.stats.ksm_zero_pages += int(z.shape[0])
        if self.waiting >= 0:
            merger._insert_unstable(c, rest[self.waiting : self.waiting + 1], stale=True)
        out: tuple[np.ndarray, np.ndarray] = (rest[joined], new[self.dup[joined]])
        return out
