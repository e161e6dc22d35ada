"""A reference KSM engine: the plain page-at-a-time algorithm, written for clarity.

Never shipped, never fast: it exists so that a property test can hold the real engine
(lksmfs.engine.ksm.Ksm, which settles chunks of pages at once) against the rules, page by
page, after every full scan (tests/unit/test_reference_engine.py).  It shares no code with
the engine: contents are compared as bytes, trees are dicts, an rmap item is an object.

What it models, after mm/ksm.c and the LKSM seed (mm/lksm.c):

* cmp_and_merge_page(): an unchanged KSM page is left alone.  LKSM (the seed, on a 4.x
  mm/ksm.c): stable_tree_search(), remove_rmap_item_from_tree(), a merge into the stable
  node found (stable_tree_append()); else the checksum gate, then use_zero_pages, then
  unstable_tree_search_insert() and, on a match, stable_tree_insert() with both items.
  Mainline (6.x): remove_rmap_item_from_tree(), the checksum gate, use_zero_pages, then
  the stable tree, then the unstable tree;
* max_page_sharing: a stable node takes at most that many mappings; a full node's content
  gets another node (a dup) at the head of a chain's list (stable_node_chain_add_dup();
  alloc_stable_node_chain() makes the full node the first dup and stamps the chain's
  chain_prune_time); a search walks the list from its head (stable_node_dup()): when
  stable_node_chains_prune_millisecs have passed since chain_prune_time (on the clock
  given; the search then stamps it) it takes the fullest dup with room, the first in
  list order among equals, else the first dup with room; either way it moves the dup to
  the head if it has room for one more after this mapping.  A node that loses its last
  mapping is freed, a chain that loses its last dup too.  A chain left with one dup
  collapses back into a plain node: mainline (6.11+) at the next walk of the stable
  tree, any stable_tree_search() or stable_tree_insert() - stable_node_dup() meets the
  dup alone (hlist_is_singular_node()), full or not; every walk is taken to pass through
  every chain (the rb-tree's memcmp order is not modelled, nor by the engine).  LKSM
  (5.4) collapses only in a pruning lookup onto a dup with room: not modelled (the
  engine does it on its prune timer; the tests run on a clock that does not move);
* the checksum gate: LKSM checks it during the initial rounds only (scan rounds before
  INITIAL_ROUND), mainline (policy `ksm`) in every pass;
* use_zero_pages: a zero-filled page that passed the gate maps the zero page: counted in
  ksm_zero_pages while it is mapped (Linux 6.10+ counts the zero-page mappings); its
  item is in no tree (volatile) and is freed at the next scan (the zero page is not an
  anonymous page: try_to_get_old_rmap_item()), unless the page was written meanwhile;
* scope: LKSM scans every mergeable VMA of every process; mainline only VM_MERGEABLE ones
  (madvise / prctl), of processes that have one;
* LKSM_FILTER, for file_data regions (anonymous pages of a private file mapping, one
  region per file for every process mapping it): every page of the region that joins a
  KSM page sets the bit of its offset (stable_tree_append_region()); once the region is
  mature (scan round - birth round > LKSM_REGION_MATURE) and has a bit, a scan visits only
  the offsets with a bit, and the items of the pages it passes by are freed
  (get_next_rmap_item()).  Not modelled: file_bss regions, conflicts and resizes (every
  process maps the file with the same size), newcomers and frozen slots (never filtered);
* exits: LKSM drops a gone process's items at the end of the scan that finds it gone
  (lksm_flush_removed_mm_list()), and an LKSM full scan with no live process to scan
  does not happen; mainline drops them first thing in its next pass (__ksm_exit() put
  the slot just behind the cursor, at the list head between passes).

The counters it reports are the kernel's: pages_shared, pages_sharing, pages_unshared,
pages_volatile, stable_node_chains, stable_node_dups, ksm_zero_pages.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

INITIAL_ROUND = 3  # mm/lksm.c: the checksum gate holds in rounds before this one
LKSM_REGION_MATURE = 5  # a region filters once scan_round - its birth round > this
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "stable_node_chains", "stable_node_dups", "ksm_zero_pages")


@dataclass(eq=False)
class RmapItem:
    """struct ksm_rmap_item: one virtual page of one process."""

    task: int
    vpn: int
    oldchecksum: bytes | None = None  # None: never checksummed
    node: StableNode | None = None  # STABLE_FLAG: a mapping of this KSM page
    unstable: bool = False  # UNSTABLE_FLAG: in an unstable tree
    region: tuple[Hashable, int] | None = None  # (file, page offset) when in a file_data region


@dataclass(eq=False)
class StableNode:
    """A KSM page: its content and the items that map it (rmap_hlist)."""

    content: bytes
    items: list[RmapItem] = field(default_factory=list)
    chain: StableChain | None = None


@dataclass(eq=False)
class StableChain:
    """stable_node_chain: the dups of one content, in the order of its hlist (head first)."""

    dups: list[StableNode] = field(default_factory=list)
    chain_prune_time: float = 0.0


@dataclass
class Process:
    """What the reference sees of a process: mergeable pages (vpn -> content) in
    address order of its VMAs, and whether it is alive."""

    pages: dict[int, bytes]
    alive: bool = True
    files: list[tuple[int, int, Hashable]] = field(default_factory=list)  # [start_vpn, end_vpn), file

    def region_of(self, vpn: int) -> tuple[Hashable, int] | None:
        for start, end, file in self.files:
            if start <= vpn < end:
                return file, vpn - start
        return None


class ReferenceKsm:
    """The page-at-a-time engine over processes given as dicts of pages."""

    def __init__(self, *, policy: str = "lksm", max_page_sharing: int = 256, use_zero_pages: bool = False,
                 filter_enabled: bool = False, clock: Callable[[], float] = lambda: 0.0,
                 stable_node_chains_prune_millisecs: int = 2000) -> None:
        if policy not in ("lksm", "ksm"):
            raise ValueError(policy)
        self.policy = policy
        self.filter_enabled = filter_enabled and policy == "lksm"
        self.births: dict[Hashable, int] = {}  # file -> the round its region was made in
        self.bits: dict[Hashable, set[int]] = {}  # file -> offsets where a page merged
        self.max_page_sharing = max_page_sharing
        self.use_zero_pages = use_zero_pages
        self.stable: dict[bytes, StableNode | StableChain] = {}
        self.unstable: dict[bytes, RmapItem] = {}
        self.items: dict[int, dict[int, RmapItem]] = {}  # task -> vpn -> item (the mm_slot's rmap_list)
        self.zero_maps: set[tuple[int, int]] = set()  # (task, vpn) mapping the zero page
        self.scan_round = 0
        self.clock = clock  # seconds: stable_node_dup()'s jiffies
        self.stable_node_chains_prune_millisecs = stable_node_chains_prune_millisecs

    # -- the stable tree ----------------------------------------------------------------

    def walk(self) -> None:
        """Mainline's walk of the stable tree (stable_tree_search(), stable_tree_insert()):
        chain_prune() / chain() reach stable_node_dup() for every chain on the way, and
        one whose dup is alone collapses into it (rb_replace_node(),
        ksm_stable_node_chains--, ksm_stable_node_dups--).  Every chain is on the way."""
        if self.policy != "ksm":
            return
        for content, entry in list(self.stable.items()):
            if isinstance(entry, StableChain) and len(entry.dups) == 1:
                (dup,) = entry.dups
                dup.chain = None
                self.stable[content] = dup

    def stable_tree_search(self, content: bytes) -> StableNode | None:
        """A node with this content that can take one more mapping: a plain node with
        room, or stable_node_dup() over a chain (chain_prune(): it may prune)."""
        self.walk()
        entry = self.stable.get(content)
        if entry is None:
            return None
        if isinstance(entry, StableNode):
            return entry if len(entry.items) < self.max_page_sharing else None
        now = self.clock()
        prune = (now - entry.chain_prune_time) * 1000 >= self.stable_node_chains_prune_millisecs
        if prune:
            entry.chain_prune_time = now
        found: StableNode | None = None
        for dup in entry.dups:
            if len(dup.items) < self.max_page_sharing:
                if not prune:
                    found = dup  # the first with room
                    break
                if found is None or len(dup.items) > len(found.items):
                    found = dup  # the fullest with room, the first of equals
        if found is not None and entry.dups[0] is not found and len(found.items) + 1 < self.max_page_sharing:
            entry.dups.remove(found)
            entry.dups.insert(0, found)
        return found

    def stable_tree_insert(self, content: bytes) -> StableNode:
        """A new KSM page; a content that has one already (full) becomes a chain of dups,
        a new dup going to the head of the chain's list (stable_node_chain_add_dup()).
        (chain() over a chain of one dup collapses it, and the chain is made again:
        a new chain_prune_time.)"""
        self.walk()
        node = StableNode(content)
        entry = self.stable.get(content)
        if entry is None:
            self.stable[content] = node
        elif isinstance(entry, StableChain):
            node.chain = entry
            if len(entry.dups) == 1:
                entry.chain_prune_time = self.clock()
            entry.dups.insert(0, node)
        else:  # alloc_stable_node_chain(): the existing node is the chain's first dup
            chain = StableChain([node, entry], self.clock())
            entry.chain = node.chain = chain
            self.stable[content] = chain
        return node

    def stable_tree_append(self, item: RmapItem, node: StableNode) -> None:
        """... and stable_tree_append_region(): the page's offset in its file region."""
        item.node = node
        node.items.append(item)
        if self.filter_enabled and item.region is not None:
            file, offset = item.region
            self.bits.setdefault(file, set()).add(offset)

    def remove_rmap_item_from_tree(self, item: RmapItem) -> None:
        """Out of the stable tree (the node is freed with its last mapping, the chain with
        its last dup) or out of the unstable tree."""
        node = item.node
        if node is not None:
            item.node = None
            node.items.remove(item)
            if not node.items:
                if node.chain is None:
                    del self.stable[node.content]
                else:
                    node.chain.dups.remove(node)
                    if not node.chain.dups:
                        del self.stable[node.content]
        item.unstable = False

    # -- one page -----------------------------------------------------------------------

    def checksum_gate(self) -> bool:
        return self.policy == "ksm" or self.scan_round < INITIAL_ROUND

    def cmp_and_merge_page(self, item: RmapItem, content: bytes) -> None:
        """LKSM (the seed, on a 4.x mm/ksm.c) asks the stable tree first and gates only
        what goes on to the unstable tree; mainline (6.x) gates every page that is not a
        KSM page first, then tries the zero page, then the stable tree."""
        if item.node is not None and item.node.content == content:
            return  # still the KSM page it was merged into
        if self.policy == "ksm":
            self.remove_rmap_item_from_tree(item)
            if self._gated(item, content) or self._to_zero_page(item, content):
                return
            if self._merge_with_stable(item, content):
                return
        else:
            if self._merge_with_stable(item, content):
                return
            if self._gated(item, content) or self._to_zero_page(item, content):
                return
        self.unstable_tree_search_insert(item, content)

    def _merge_with_stable(self, item: RmapItem, content: bytes) -> bool:
        """stable_tree_search(), remove_rmap_item_from_tree(), and a merge into the node
        found (try_to_merge_with_ksm_page(): same bytes, it works)."""
        kpage = self.stable_tree_search(content)
        self.remove_rmap_item_from_tree(item)
        if kpage is None:
            return False
        self.stable_tree_append(item, kpage)
        return True

    def _gated(self, item: RmapItem, content: bytes) -> bool:
        """calc_checksum(): a page whose checksum changed since its last visit waits."""
        if self.checksum_gate() and item.oldchecksum != content:
            item.oldchecksum = content
            return True
        return False

    def _to_zero_page(self, item: RmapItem, content: bytes) -> bool:
        """try_to_merge_with_zero_page()."""
        if self.use_zero_pages and not any(content):
            self.zero_maps.add((item.task, item.vpn))
            return True
        return False

    def unstable_tree_search_insert(self, item: RmapItem, content: bytes) -> None:
        """A page equal to this one in the unstable tree: both become a new KSM page
        (try_to_merge_two_pages() + stable_tree_insert()); else this one is inserted."""
        tree_item = self.unstable.get(content)
        if tree_item is None:
            self.unstable[content] = item
            item.unstable = True
            return
        del self.unstable[content]
        tree_item.unstable = False
        node = self.stable_tree_insert(content)
        self.stable_tree_append(tree_item, node)
        self.stable_tree_append(item, node)

    # -- a full scan --------------------------------------------------------------------

    def full_scan(self, procs: dict[int, Process]) -> dict[str, int]:
        """One full scan over `procs` (task -> Process; a task the reference saw before
        and that is no longer alive has exited); returns the counters after it.  LKSM
        with no live process has nothing to scan: no scan happens, and a gone process's
        items stay until one does (it frees them at the end of a scan); mainline's pass
        still runs over the exited mm's slot and frees them."""
        if self.policy == "lksm" and not any(p.alive for p in procs.values()):
            return self.counters()
        self.scan_round += 1
        self.unstable = {}  # a new round: the unstable tree starts empty
        dead = [t for t in self.items if t not in procs or not procs[t].alive]
        if self.policy == "ksm":
            # __ksm_exit() moved the exited mm's slot just behind the cursor, which rests
            # on the list head between passes: the pass meets it first, finds the mm
            # exiting (ksm_test_exit()) and frees its items (remove_trailing_rmap_items())
            for task in dead:
                self._drop(task)
        for task in sorted(procs):
            if procs[task].alive:
                self._scan_process(task, procs[task])
        for task in dead:  # lksm_flush_removed_mm_list() (mainline: already done)
            self._drop(task)
        return self.counters()

    def _scan_process(self, task: int, proc: Process) -> None:
        rmap = self.items.setdefault(task, {})
        for vpn in [v for v in rmap if v not in proc.pages]:  # pages gone: their items too
            self._free(rmap.pop(vpn))
        if self.filter_enabled:
            for _, _, file in proc.files:  # ksm_join(): the region of the file, made once, in
                # lksm_prepare_full_scan() before it counts the new round (ksm_crawl_round++)
                self.births.setdefault(file, self.scan_round - 1)
        for vpn in sorted(proc.pages):
            content = proc.pages[vpn]
            if (task, vpn) in self.zero_maps:
                if not any(content):  # still the zero page: not anonymous, its item goes
                    if vpn in rmap:
                        self._free(rmap.pop(vpn))
                    continue
                # written since: an anonymous page again (the write fault unmapped the zero
                # page: ksm_zero_pages counts mappings, scanned or not)
                self.zero_maps.discard((task, vpn))
            region = proc.region_of(vpn) if self.filter_enabled else None
            if region is not None and self._filtered_out(*region):
                if vpn in rmap:  # passed by: get_next_rmap_item() frees its item
                    self._free(rmap.pop(vpn))
                continue
            item = rmap.get(vpn)
            if item is None:
                item = rmap[vpn] = RmapItem(task, vpn)
            item.region = region
            self.cmp_and_merge_page(item, content)

    def _filtered_out(self, file: Hashable, offset: int) -> bool:
        """__scan_next_rmap_item(): a mature region with bits lets only their offsets by."""
        bits = self.bits.get(file, set())
        mature = self.scan_round - self.births[file] > LKSM_REGION_MATURE
        return mature and bool(bits) and offset not in bits

    def _free(self, item: RmapItem) -> None:
        """remove_rmap_item_from_tree() + free_rmap_item().  Pages vanish and processes
        exit between scans: a freed item is never in this round's unstable tree."""
        self.remove_rmap_item_from_tree(item)

    def _drop(self, task: int) -> None:
        for item in self.items.pop(task, {}).values():
            self._free(item)
        self.zero_maps = {z for z in self.zero_maps if z[0] != task}

    # -- counters -----------------------------------------------------------------------

    def all_items(self) -> Iterable[RmapItem]:
        for rmap in self.items.values():
            yield from rmap.values()

    def nodes(self) -> list[StableNode]:
        out: list[StableNode] = []
        for entry in self.stable.values():
            out += entry.dups if isinstance(entry, StableChain) else [entry]
        return out

    def counters(self) -> dict[str, int]:
        items = list(self.all_items())
        nodes = self.nodes()
        shared = len(nodes)
        sharing = sum(len(n.items) - 1 for n in nodes)
        unshared = sum(1 for i in items if i.unstable)
        chains = [e for e in self.stable.values() if isinstance(e, StableChain)]
        return {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": len(items) - shared - sharing - unshared,
            "stable_node_chains": len(chains),
            "stable_node_dups": sum(len(c.dups) for c in chains),
            "ksm_zero_pages": len(self.zero_maps),
        }
