"""Exact fast-forwarding of quiet slots, for simulated memory (`lksmfs compare`).

Mainline ksmd at its defaults visits 5,000 pages a simulated second: hours of a device's
life are tens of millions of page visits, and the engine spends a fixed cost on every
VMA of every visit.  But simulated memory only changes at a timeline round's boundary,
and most visits then change nothing that can reach another page: a KSM page that is
still one is left alone, and a page no other page can merge with - no other candidate
of its content in this pass, none in the unstable tree, no KSM page with room for it -
only goes through its own small automaton (smart_scan's age and skips, the checksum
gate, back into the unstable tree).  Such a slot is *quiet*, and its scan is exactly:

- every item's automaton step, computed for the whole slot at once (numpy);
- the counters that step moves (pages_scanned, pages_skipped, pages_unshared);
- the unstable tree entries the slot's waiting pages would have made;
- the slot's end as the scanner does it (slot_done).

`FastScanner.run(budget)` runs the scan the policy handed over, up to `budget` scanned
pages, taking each slot the fast way when it is quiet and the engine's own scanner
otherwise (a slot with a broken merge, a page that would merge, a new or changed layout,
LKSM's frozen or newcomer slots, the checksum rounds, zero pages...).  Nothing is
approximated: a slot is either provably quiet or scanned by the engine; the unit tests
check that both ways give the same state and counters, item for item.

The source must name each page's content (lksmfs.workload.simulated.SimulatedSource:
equal keys, equal bytes), so that a page's digest is computed once per content instead
of read and hashed on every visit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from lksmfs.engine.context import FastScanCtx
from lksmfs.engine.hashindex import HashIndex, normkey
from lksmfs.engine.ksmd import AGE_MAX, SMART_SCAN_MIN_AGE, KsmdPolicy, skip_age
from lksmfs.engine.merge import SourceError
from lksmfs.engine.pages import XXH3, Digest
from lksmfs.engine.params import (
    KSM_MM_FROZEN,
    KSM_MM_NEWCOMER,
    KSM_MM_SCANNED,
    LKSM_SCAN_FULL,
    MERGE_WIN,
    POLICY_KSM,
)
from lksmfs.engine.rmap import NOT_FROZEN, SEQNR_MASK, STABLE, UNSTABLE, calc_checksum
from lksmfs.engine.slot import MmSlot
from lksmfs.engine.stats import scan_record
from lksmfs.sources.base import MemorySource, TaskId, inner_source


@runtime_checkable
class KeyedSource(Protocol):
    """A MemorySource that names contents (what fast-forwarding needs)."""

    def page_keys(self, task: TaskId, vpns: np.ndarray) -> np.ndarray:
        """A uint64 key per page: equal keys iff equal bytes."""
        ...

    def contents(self, keys: np.ndarray) -> memoryview:
        """The bytes of pages with these keys."""
        ...

    def content_version(self, task: TaskId) -> int:
        """Changes whenever a page of the task changes content."""
        ...

    def layout_version(self, task: TaskId) -> int:
        """Changes whenever the task's mappings or present pages change."""
        ...


def keyed_source(source: MemorySource) -> KeyedSource | None:
    """The keyed source under the engine's (mainline wraps it), or None."""
    return inner_source(source, KeyedSource)  # type: ignore[type-abstract]  # a protocol: isinstance only


def smart_scan_step(age: np.ndarray, skips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """should_skip_rmap_item() as a pure function of (age, remaining_skips) arrays of
    pages that are not KSM pages: (new age, new skips, skipped) - the same rule as
    lksmfs.engine.ksmd.should_skip, without touching an rmap."""
    new_age = np.where(age != AGE_MAX, age + np.uint8(1), age).astype(np.uint8)
    old = age >= SMART_SCAN_MIN_AGE
    reset = old & (skips == 0)
    skip = old & (skips != 0)
    new_skips = skips.copy()
    new_skips[reset] = skip_age(age[reset])
    new_skips[skip] -= np.uint8(1)
    return new_age, new_skips, skip


class Digests:
    """Content key -> the engine's 96-bit digest, each content hashed once."""

    def __init__(self, source: KeyedSource, digest: Digest = XXH3) -> None:
        self.source = source
        self.digest = digest
        self.index = HashIndex(1 << 16)
        self.lo = np.zeros(1 << 16, dtype=np.uint64)
        self.hi = np.zeros(1 << 16, dtype=np.uint64)
        self.n = 0

    def of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # keys 0..3 could meet the index's folded markers: hashed every time instead
        plain = keys >= 4
        ref = np.full(keys.shape[0], -1, dtype=np.int64)
        ref[plain] = self.index.get_many(keys[plain])
        new = plain & (ref < 0)
        if new.any():
            fresh = np.unique(keys[new])
            lo, hi = self.digest.pages(self.source.contents(fresh), int(fresh.shape[0]))
            ids = np.arange(self.n, self.n + fresh.shape[0], dtype=np.int64)
            self._grow(self.n + int(fresh.shape[0]))
            self.lo[ids], self.hi[ids] = lo, hi
            self.n += int(fresh.shape[0])
            self.index.put_many(fresh, ids)
            ref[new] = self.index.get_many(keys[new])
        lo = np.where(ref >= 0, self.lo[np.maximum(ref, 0)], np.uint64(0))
        hi = np.where(ref >= 0, self.hi[np.maximum(ref, 0)], np.uint64(0))
        odd = ~plain
        if odd.any():
            slo, shi = self.digest.pages(self.source.contents(keys[odd]), int(np.count_nonzero(odd)))
            lo[odd], hi[odd] = slo, shi
        return lo, hi

    def _grow(self, n: int) -> None:
        if n > self.lo.shape[0]:
            cap = max(n, 2 * self.lo.shape[0])
            self.lo = np.resize(self.lo, cap)
            self.hi = np.resize(self.hi, cap)


@dataclass
class Plan:
    """What a quiet scan of one slot does, computed before anything changes."""

    slot: MmSlot
    scanned: int  # pages it counts (not skipped)
    lo: np.ndarray  # digests of its items' pages
    cand: np.ndarray  # bool: items that wait in the unstable tree again
    skip: np.ndarray  # bool: items smart_scan skips
    changed: np.ndarray  # bool: items whose checksum changed (volatile until next pass)
    cksum: np.ndarray  # the checksum each item shows now
    age: np.ndarray | None  # smart_scan state after the visit (mainline only)
    skips: np.ndarray | None


@dataclass
class Record:
    """A slot's last complete scan by the engine: what a quiet scan may assume - the
    rmap list it built (its items are the pages a scan visits), the layout it saw, and
    the region table's fingerprint then (LKSM; None under mainline)."""

    rmap: object
    layout: int
    regions: object


@dataclass
class RunResult:
    scanned: int  # pages scanned by the run (may pass `soft` by a fast slot, never `hard`)
    wrapped: bool  # the scan ended in this run
    at_soft: tuple[int, int] | None  # (pages_scanned, pages_sharing) when `soft` was reached


class FastScanner:
    """Runs the engine's handed-over scan in budgets of scanned pages, quiet slots fast."""

    def __init__(self, ksm: FastScanCtx, *, fast: bool = True) -> None:
        self.k = ksm
        self.keyed = keyed_source(ksm.source) if fast else None
        self.digests = Digests(self.keyed, ksm.digest) if self.keyed is not None else None
        self.records: dict[int, Record] = {}
        self._cache: dict[int, tuple[object, int, np.ndarray, np.ndarray]] = {}
        self._fp: tuple[int, object] | None = None
        self.fast_slots = 0
        self.slow_slots = 0
        self.jumps: list[Passes] = []  # every pass run by jump(), for samples inside them
        # the slot the engine is scanning slowly: (slot, regions before, not newcomer/frozen)
        self._started: tuple[MmSlot | None, object, bool] = (None, None, False)

    # -- the run -----------------------------------------------------------------------

    def run(self, soft: int, hard: int | None = None) -> RunResult:
        """Scan up to `soft` pages; a quiet slot that starts before `soft` may carry on to
        `hard` (the scan's state at `soft` is then reported: nothing a quiet slot does
        moves pages_sharing).  Stops where the scan wraps up."""
        k = self.k
        sc = k.scanner
        hard = soft if hard is None else hard
        start = k.stats.pages_scanned
        self._fp = None  # the crawler may have registered regions since the last run
        if self.keyed is None or not k.tunables.merge_across_nodes:  # digests are per node: the scanner's
            sc.batch(soft)
            return RunResult(k.stats.pages_scanned - start, not sc.scan_state, None)
        if not sc.started:
            sc.batch(0)  # the scan's first batch: scan_starting()
        at_soft: tuple[int, int] | None = None
        while sc.scan_state:
            done = k.stats.pages_scanned - start
            if done >= soft:
                break
            if sc.gen is None:
                slot = k.mm.scan_list.first()
                if slot is None:
                    sc.batch(0)  # the list is done: the wrap-up, in this batch
                    break
                plan = self._plan(slot)
                if plan is not None and done + plan.scanned <= hard:
                    if done + plan.scanned > soft:
                        at_soft = (start + soft, k.stable.pages_sharing)
                    self._apply(plan)
                    self.fast_slots += 1
                    continue
            self._slow(soft - done)
        k.publish()
        return RunResult(k.stats.pages_scanned - start, not sc.scan_state, at_soft)

    def _slow(self, budget: int) -> None:
        """The engine's scanner on the current (or next) slot, to its end or the budget."""
        k = self.k
        sc = k.scanner
        slot = sc.cur if sc.gen is not None else k.mm.scan_list.first()
        fresh = sc.gen is None
        fp_before = self._regions() if fresh and slot is not None else None
        # LKSM's walk filters differently for newcomers and frozen slots: not a record
        clean = slot is not None and (k.policy == POLICY_KSM or not slot.test(KSM_MM_NEWCOMER | KSM_MM_FROZEN))
        sc.one_slot = True
        try:
            sc.batch(budget)
        finally:
            sc.one_slot = False
        self._fp = None
        if slot is None:
            return
        if fresh:
            self.slow_slots += 1
            self._started = (slot, fp_before, clean)
        if sc.gen is None:  # the slot is done: what a quiet scan of it may assume next
            started, fp0, was_clean = self._started
            self.records.pop(slot.sid, None)
            if started is slot and not slot.removed and was_clean:
                fp1 = self._regions()
                if fp0 == fp1:  # its own walk changed no region: the next one is the same
                    assert self.keyed is not None
                    try:
                        self.records[slot.sid] = Record(slot.rmap, self.keyed.layout_version(slot.task), fp1)
                    except SourceError:
                        pass

    # -- whole passes (mainline) -----------------------------------------------------------

    def jump(self, start_ms: int, hard_ms: int) -> Passes | None:
        """Mainline ksmd, from a pass just handed over (every slot queued, none begun):
        when nothing anywhere can merge or break - the state is quiet as a whole, so
        every item only follows its own automaton - run every whole pass that ends
        before `hard_ms` at once over all items (and, once the passes repeat - period 1,
        or 9 with smart_scan - every repetition arithmetically).  Returns the passes
        run, the engine left between passes as after the last; None (nothing changed)
        when the state is not quiet or not even one pass fits."""
        k = self.k
        sc = k.scanner
        t = k.tunables
        if self.keyed is None or k.policy != POLICY_KSM or t.use_zero_pages or k.mm.remove_list:
            return None
        if t.advisor_mode or not t.merge_across_nodes:  # retuned at every wrap; per-node keys
            return None
        slots = list(k.mm.scan_list)
        if (not sc.scan_state or sc.gen is not None or sc.cur is not None or not sc.at_head
                or not slots or len(slots) != len(k.mm.slots)):
            return None
        los, his = [], []
        for slot in slots:
            known = self._known(slot)
            if known is None:
                return None
            los.append(known[0])
            his.append(known[1])
        sizes = np.array([len(sl.rmap) for sl in slots], dtype=np.int64)
        lo, hi = np.concatenate(los), np.concatenate(his)
        flags = np.concatenate([sl.rmap.flags for sl in slots])
        node = np.concatenate([sl.rmap.node for sl in slots])
        stable = (flags & STABLE) != 0
        ksm_page = k.stable.unchanged(flags, node, lo, hi)
        if (stable & ~ksm_page).any():
            return None
        non = np.flatnonzero(~ksm_page)
        if non.size and not self._quiet(lo[non], hi[non], at_head=True):
            return None
        return self._run_passes(slots, sizes, ksm_page, non, hi, start_ms, hard_ms)

    def _run_passes(self, slots: list[MmSlot], sizes: np.ndarray, ksm_page: np.ndarray, non: np.ndarray,
                    hi: np.ndarray, start_ms: int, hard_ms: int) -> Passes | None:
        """The quiet passes themselves: every non-KSM item's automaton, pass by pass,
        until the pattern repeats; whole repetitions at once; then written back."""
        k = self.k
        t = k.tunables
        pts, sleep, smart = t.pages_to_scan, t.sleep_millisecs, bool(t.smart_scan)
        prune_ms = t.stable_node_chains_prune_millisecs
        cols = {c: np.concatenate([getattr(sl.rmap, c) for sl in slots])
                for c in ("flags", "cksum", "age", "skips", "seq")}
        ck = calc_checksum(hi[non])
        age, skips, seq = cols["age"][non], cols["skips"][non], cols["seq"][non]
        ok = cols["cksum"][non] == ck
        unstable = (cols["flags"][non] & UNSTABLE) != 0
        unshared0 = int(np.count_nonzero(unstable))
        n_ksm = int(np.count_nonzero(ksm_page))
        slot_of = np.repeat(np.arange(len(slots)), sizes)
        owner = slot_of[non]
        ksm_per_slot = np.bincount(slot_of[ksm_page], minlength=len(slots))
        period = STATE_AGE_CAP if smart else 1
        rnd = k.crawler.crawl_round  # the round of the pass handed over
        blocks: list[Passes] = [Passes(start_ms, 0, [], [], 0, 1)]
        history: list[tuple[bytes, int, int, int, np.ndarray]] = []  # state, start, scanned, skipped, per slot
        per_slot_total = np.zeros(len(slots), dtype=np.int64)
        skipped_total = 0
        passes = 0
        # the last pass: scanned, per slot, waiting, start
        last = (0, np.zeros(len(slots), dtype=np.int64), 0, start_ms)
        last_prune = k.scanner.last_prune
        now = start_ms
        repeated = False
        while True:
            if smart:
                new_age, new_skips, skip = smart_scan_step(age, skips)
            else:
                new_age, new_skips, skip = age, skips, np.zeros(non.shape[0], dtype=bool)
            scan = ~skip
            count = n_ksm + int(np.count_nonzero(scan))
            if now + count // pts * sleep >= hard_ms:
                break  # this pass would not end before memory changes
            # skipped items leave the tree; the others show their checksum, then wait in it
            changed = scan & ~ok
            cand = scan & ok
            unstable = (unstable & ~skip & ~changed) | cand
            ok = ok | changed
            seq = np.where(cand, np.uint8(rnd & SEQNR_MASK), seq)
            age, skips = new_age, new_skips
            per_slot = ksm_per_slot + np.bincount(owner[scan], minlength=len(slots))
            per_slot_total += per_slot
            n_skip = int(np.count_nonzero(skip))
            skipped_total += n_skip
            last = (count, per_slot, int(np.count_nonzero(cand)), now)
            if cand.any() and k.stable.singular:
                # the pass's pages past the gate walk the stable tree: chains left with
                # one dup (before these passes: nothing breaks here) collapse
                k.stable.walked()
            if (now / 1000 - last_prune) * 1000 >= prune_ms:  # _maybe_prune_chains(): a no-op here
                last_prune = now / 1000
            blocks[-1].starts.append(now - blocks[-1].t0)
            blocks[-1].scanned.append(count)
            history.append((b"".join((np.minimum(age, STATE_AGE_CAP).tobytes(), skips.tobytes(), ok.tobytes(),
                                      unstable.tobytes())), now, count, n_skip, per_slot))
            passes += 1
            rnd += 1
            now += count // pts * sleep + sleep  # ksmd sleeps after the wrapping batch
            if repeated or len(history) <= period or history[-1][0] != history[-1 - period][0]:
                continue
            # the last `period` passes repeat for ever: as many whole repetitions as fit
            repeated = True
            rep = history[-period:]
            period_ms = now - rep[0][1]
            tail = rep[-1][1] - rep[0][1] + rep[-1][2] // pts * sleep  # its last wrap, from its start
            m = (hard_ms - 1 - now - tail) // period_ms + 1 if now + tail < hard_ms else 0
            if m <= 0:
                continue
            blocks.append(Passes(now, 0, [h[1] - rep[0][1] for h in rep], [h[2] for h in rep], period_ms, m))
            for i in range(m * period):  # the prune clock, pass head by pass head
                head = now + i // period * period_ms + blocks[-1].starts[i % period]
                if (head / 1000 - last_prune) * 1000 >= prune_ms:
                    last_prune = head / 1000
            if smart:
                age = np.minimum(age.astype(np.int64) + m * period, 255).astype(np.uint8)
            seq = ((seq.astype(np.int64) + m * period) & SEQNR_MASK).astype(np.uint8)
            per_slot_total += m * sum(h[4] for h in rep)
            skipped_total += m * sum(h[3] for h in rep)
            passes += m * period
            rnd += m * period
            last = (*last[:3], last[3] + m * period_ms)  # the same pass, m repetitions on
            now += m * period_ms
            blocks.append(Passes(now, 0, [], [], 0, 1))
        if not passes:
            return None
        self._write_back(slots, sizes, cols, non, ck, ok, unstable, unshared0, age, skips, seq)
        st = k.stats
        base = st.pages_scanned
        st.pages_scanned += int(per_slot_total.sum())
        st.pages_skipped += skipped_total
        st.nr_full_scan += passes
        st.end_slot()
        st.end_scan()
        self._slots_after(slots, passes, per_slot_total, last[1], last[3])
        self._cursor_after(rnd - 1, last[2], last_prune, now - sleep, len(slots), last[0])
        k.publish()
        blocks = [b for b in blocks if b.starts]
        for b in blocks:
            b.base = base
            base += b.per_rep * b.reps
        self.jumps += blocks
        return blocks[0]

    def _write_back(self, slots: list[MmSlot], sizes: np.ndarray, cols: dict[str, np.ndarray], non: np.ndarray,
                    ck: np.ndarray, ok: np.ndarray, unstable: np.ndarray, unshared0: int, age: np.ndarray,
                    skips: np.ndarray, seq: np.ndarray) -> None:
        """The items after the passes, into each slot's rmap list (same objects)."""
        self.k.stats.pages_unshared += int(np.count_nonzero(unstable)) - unshared0
        fl = cols["flags"][non]
        cols["flags"][non] = np.where(unstable, fl | UNSTABLE, fl & ~UNSTABLE)
        cols["cksum"][non] = np.where(ok, ck, cols["cksum"][non])
        cols["age"][non], cols["skips"][non], cols["seq"][non] = age, skips, seq
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for i, sl in enumerate(slots):
            a, b = int(bounds[i]), int(bounds[i + 1])
            for c, v in cols.items():
                getattr(sl.rmap, c)[:] = v[a:b]

    def _slots_after(self, slots: list[MmSlot], passes: int, per_slot_total: np.ndarray,
                     last_per_slot: np.ndarray, last_start: int) -> None:
        """Each slot's end, `passes` times over (slot_done): states, merge windows and
        the VIP order (all zeros from the third quiet pass on: only the window's index
        still turns), pages scanned, and the last pass's elapsed time."""
        k = self.k
        t = k.tunables
        for _ in range(min(passes, MERGE_WIN + 1)):
            for sl in slots:
                k.mm.place_vip(sl, 0)
        before = np.concatenate([[0], np.cumsum(last_per_slot)])
        for i, sl in enumerate(slots):
            sl.merge_idx = (sl.merge_idx + max(0, passes - MERGE_WIN - 1)) % MERGE_WIN
            sl.nr_scans += int(per_slot_total[i])
            sl.clear(KSM_MM_NEWCOMER | KSM_MM_FROZEN)
            sl.set(KSM_MM_SCANNED)
            # the PacedClock's times of the batches its last scan began and ended in
            begin = last_start + int(before[i]) // t.pages_to_scan * t.sleep_millisecs
            end = last_start + int(before[i + 1]) // t.pages_to_scan * t.sleep_millisecs
            sl.elapsed = end / 1000 - begin / 1000

    def _cursor_after(self, rnd: int, waiting: int, last_prune: float, wrap_ms: int, nslots: int,
                      last_scanned: int) -> None:
        """The scanner and the policy between passes, after the last one (round `rnd`)."""
        k = self.k
        k.scanner.between_passes(rnd, waiting, last_prune, scan_record(LKSM_SCAN_FULL, nslots, last_scanned))
        k.crawler.crawl_round = rnd
        if isinstance(k.crawler, KsmdPolicy):  # as scan_wrapped() says it, at the wrap
            k.crawler.set_next_pass(wrap_ms / 1000 + k.tunables.sleep_millisecs / 1000)

    # -- one slot ------------------------------------------------------------------------

    def _regions(self) -> object:
        """A fingerprint of what LKSM_FILTER's walk of a slot reads and writes (every
        region's state, and whether it filters in the scan's round)."""
        k = self.k
        if not k.filter_enabled:
            return None
        rnd = k.crawler.crawl_round
        if self._fp is not None and self._fp[0] == rnd:
            return self._fp[1]
        regs = k.regions
        fp = (
            regs.nr_regions,
            tuple(sorted(regs.by_key.items())),
            tuple(
                (rid, int(r.type), r.len, r.conflict, r.filter_cnt, r.next, r.prev, r.scan_round,
                 None if r.bits is None else r.bits.tobytes(), regs.use_filter(rid, rnd))
                for rid, r in sorted(regs.regions.items())
            ),
        )
        self._fp = (rnd, fp)
        return fp

    def _digests_of(self, slot: MmSlot) -> tuple[np.ndarray, np.ndarray]:
        assert self.keyed is not None and self.digests is not None
        version = self.keyed.content_version(slot.task)
        got = self._cache.get(slot.sid)
        if got is not None and got[0] is slot.rmap and got[1] == version:
            return got[2], got[3]
        lo, hi = self.digests.of(self.keyed.page_keys(slot.task, slot.rmap.vpn))
        self._cache[slot.sid] = (slot.rmap, version, lo, hi)
        return lo, hi

    def _known(self, slot: MmSlot) -> tuple[np.ndarray, np.ndarray] | None:
        """The digests of the slot's pages, if the engine's last complete scan of it still
        says which pages a scan visits (its rmap list, its layout); else None."""
        rec = self.records.get(slot.sid)
        if rec is None or rec.rmap is not slot.rmap or slot.zero_vpns.size or slot.thp_zero.size or self.keyed is None:
            return None
        if not self.k.filter_enabled or rec.regions == self._regions():
            try:
                if self.keyed.layout_version(slot.task) == rec.layout:
                    return self._digests_of(slot)
            except SourceError:
                pass
        return None

    def _plan(self, slot: MmSlot) -> Plan | None:
        """The slot's scan, if it is quiet; None when the engine must scan it."""
        k = self.k
        t = k.tunables
        mainline = k.policy == POLICY_KSM
        if t.use_zero_pages:
            return None
        if not mainline and (slot.test(KSM_MM_NEWCOMER | KSM_MM_FROZEN)
                             or k.crawler.checksum_gate(k.crawler.crawl_round)):
            return None
        known = self._known(slot)
        if known is None:
            return None
        lo, hi = known
        rm = slot.rmap
        n = len(rm)
        stable = (rm.flags & STABLE) != 0
        ksm_page = k.stable.unchanged(rm.flags, rm.node, lo, hi)
        if (stable & ~ksm_page).any():
            return None  # a broken merge: its KSM page loses a mapping
        other = ~ksm_page
        skip = np.zeros(n, dtype=bool)
        changed = np.zeros(n, dtype=bool)
        ck = rm.cksum
        age = skips = None
        if mainline:
            if t.smart_scan:
                oi = np.flatnonzero(other)
                age, skips = rm.age.copy(), rm.skips.copy()
                a, s, sk = smart_scan_step(rm.age[oi], rm.skips[oi])
                age[oi], skips[oi] = a, s
                skip[oi[sk]] = True
            ck = calc_checksum(hi)
            changed = other & ~skip & (rm.cksum != ck)
        cand = other & ~skip & ~changed
        if cand.any() and not self._quiet(lo[cand], hi[cand], at_head=k.scanner.at_head):
            return None
        return Plan(slot, n - int(np.count_nonzero(skip)), lo, cand, skip, changed, ck, age, skips)

    def _quiet(self, lo: np.ndarray, hi: np.ndarray, at_head: bool) -> bool:
        """Can none of these pages merge: no two alike, none alike in the unstable tree,
        no KSM page with their content and room for one more mapping?"""
        k = self.k
        keys = normkey(lo)
        if np.unique(keys).shape[0] != keys.shape[0]:
            return False
        if not at_head and (k.unstable.get_many(keys) >= 0).any():
            return False  # (at the list head the unstable tree starts afresh)
        sref = k.stable.index.get_many(keys)
        hit = np.flatnonzero(sref != -1)
        mps = k.tunables.max_page_sharing
        for i in hit.tolist():
            ref = int(sref[i])
            if ref >= 0:
                same = int(k.stable.lo[ref]) == int(lo[i]) and int(k.stable.hi[ref]) == int(hi[i])
                if not same or int(k.stable.nlen[ref]) < mps:
                    return False  # room (or a key that only looks alike: the engine decides)
            else:
                return False  # a chain: every lookup may move its chain_prune_time
                # (stable_node_dup()), which later lookups' choices depend on
        return True

    def _apply(self, p: Plan) -> None:
        """The quiet slot's scan: the scanner's cursor step, each item's automaton, the
        unstable tree entries, the counters, and the slot's end."""
        k = self.k
        sc = k.scanner
        begin = k.clock()
        slot = sc.next_slot()  # the cursor (a new pass resets the unstable tree here)
        assert slot is p.slot
        rm = slot.rmap
        st = k.stats
        flags = rm.flags
        if k.policy != POLICY_KSM:
            flags &= NOT_FROZEN  # a slot that is not frozen drops the frozen bit
        # remove_rmap_item_from_tree() for every item visited but a KSM page
        k.merger.remove_from_tree(rm, np.flatnonzero(p.cand | p.skip | p.changed))
        if p.age is not None and p.skips is not None:
            rm.age[:] = p.age
            rm.skips[:] = p.skips
            st.pages_skipped += int(np.count_nonzero(p.skip))
        rm.cksum[p.changed] = p.cksum[p.changed]
        c = np.flatnonzero(p.cand)
        if c.size:
            if k.policy == POLICY_KSM:
                # mainline: each walks the stable tree first (stable_tree_search()), which
                # collapses the chains left with one dup before this slot (StableTree.walked())
                k.stable.walked()
            k.merger.unstable_insert(rm, c, p.lo[c], c.astype(np.int64) + k.unstable.visit(slot, len(rm)))
        st.pages_scanned += p.scanned
        slot.nr_scans += p.scanned
        sc.slot_done(slot, k.clock() - begin)
        sc.cur = None


# -- whole passes of mainline ksmd -------------------------------------------------------

STATE_AGE_CAP = 9  # skip_age() is the same for every age from 9 up: older ages act alike


@dataclass
class Passes:
    """Passes a jump ran: `reps` times the pattern of (start, scanned) pairs - start in ms
    relative to `t0 + rep * period_ms` - each pass's scanned pages counted from `base`."""

    t0: int
    base: int  # pages_scanned before the first of them
    starts: list[int]
    scanned: list[int]
    period_ms: int
    reps: int = 1

    @property
    def per_rep(self) -> int:
        return sum(self.scanned)

    def end_ms(self, pts: int, sleep: int) -> int:
        """The time of the batch that wrapped the last pass."""
        last = (self.reps - 1) * self.period_ms + self.starts[-1]
        return self.t0 + last + self.scanned[-1] // pts * sleep

    def scanned_at(self, ts: int, pts: int, sleep: int) -> int:
        """pages_scanned after every batch before `ts` (ts past t0)."""
        rep = max(0, min(self.reps - 1, (ts - self.t0) // self.period_ms)) if self.period_ms else 0
        total = self.base + rep * self.per_rep
        for start, n in zip(self.starts, self.scanned, strict=True):
            s = self.t0 + rep * self.period_ms + start
            if ts <= s:
                break
            total += min(n, -(-(ts - s) // sleep) * pts)
        return total


def scanned_at(blocks: list[Passes], ts: int, pts: int, sleep: int) -> int | None:
    """pages_scanned at `ts` if one of these jumps covered it (None: ask the engine)."""
    for b in reversed(blocks):
        if b.t0 < ts <= b.end_ms(pts, sleep):
            return b.scanned_at(ts, pts, sleep)
        if ts > b.end_ms(pts, sleep):
            return None
    return None
