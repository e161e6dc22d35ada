"""stable_node_dup() (mm/ksm.c) in the engine's StableTree, on a virtual clock.

A chain's dups are an hlist: stable_node_chain_add_dup() adds a new dup at the head,
alloc_stable_node_chain() stamps chain_prune_time.  A lookup from stable_tree_search()
(chain_prune()) prunes only once stable_node_chains_prune_millisecs have passed since
chain_prune_time (and stamps it again): then it takes the fullest dup with room, else the
first dup with room from the head.  The dup found moves to the head when it can take one
more mapping after this one.  Expected values below are worked by hand from those rules.

A chain left with one dup collapses back into a plain node.  Mainline (6.11+) does it in
stable_node_dup() itself, at any walk of the stable tree that reaches the chain
(chain_prune() from stable_tree_search(), chain() from stable_tree_insert()):

    if (hlist_is_singular_node(&found->hlist_dup, &stable_node->hlist)) {
            rb_replace_node(&stable_node->node, &found->node, root);
            free_stable_node(stable_node);
            ksm_stable_node_chains--;
            ksm_stable_node_dups--;

whether the dup found is a sharing candidate (has room) or not; StableTree.walked().
Linux 5.4 (LKSM's base) required `prune_stale_stable_nodes && nr == 1` and a found dup,
which only a sharing candidate could be: StableTree.prune_chains().  The engine tests at
the end run mainline ksmd (policy `ksm`) on processes whose pages walk the tree or not.
"""

from __future__ import annotations

from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.stable import StableTree
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.workload.driver import VirtualClock

MPS = 4
LO, HI = 5, 7  # one content


def counters(st: StableTree) -> tuple[int, int, int, int]:
    return st.pages_shared, st.pages_sharing, st.stable_node_chains, st.stable_node_dups


def chain_of_two(clock: VirtualClock) -> tuple[StableTree, int, int]:
    """At t=0: A full (4), then B made for the same content: the chain [B, A] (head
    first), chain_prune_time 0.  B takes 3 mappings, then loses 2 (B=1) and A loses 2
    (A=2): the head B has room and is the less full."""
    st = StableTree(lambda: (clock(), 2000))
    a = st.insert(LO, HI)
    for _ in range(MPS):
        st.append(a)
    b = st.insert(LO, HI)
    for _ in range(3):
        st.append(b)
    st.remove(b)
    st.remove(b)
    st.remove(a)
    st.remove(a)
    assert counters(st) == (2, 1, 1, 2)  # A: 2 mappings, B: 1
    return st, a, b


def test_before_the_prune_interval_the_first_dup_with_room_from_the_head_is_taken() -> None:
    """1.999 s after the chain was made: no prune, B (head, 1 mapping) is taken although
    A (2) is fuller.  B gets a second mapping; A then loses both of its: A goes, B (2
    mappings) is left - 1 KSM page, 1 sharing, the chain of 1 dup."""
    clock = VirtualClock()
    st, a, b = chain_of_two(clock)
    clock.now = 1.999
    assert st.search(LO, HI, MPS) == b
    st.append(b)
    st.remove(a)
    st.remove(a)
    assert counters(st) == (1, 1, 1, 1)


def test_once_the_prune_interval_passed_the_fullest_dup_is_taken() -> None:
    """2 s after: the lookup prunes, A (2 mappings) is taken over the head B (1).  A gets
    a third mapping; A then loses two: A and B keep 1 each - 2 KSM pages, 0 sharing,
    2 dups (the counters differ from the non-pruning lookup's)."""
    clock = VirtualClock()
    st, a, b = chain_of_two(clock)
    clock.now = 2.0
    assert st.search(LO, HI, MPS) == a
    st.append(a)
    st.remove(a)
    st.remove(a)
    assert counters(st) == (2, 0, 1, 2)


def test_the_pruning_lookup_moves_its_dup_to_the_head_and_stamps_the_chain() -> None:
    """At 2 s the pruning lookup takes A (2 + 1 < 4: it goes to the head, [A, B]) and
    stamps chain_prune_time = 2 s.  A gets its third mapping, then loses two (A=1); B
    gets two (B=3).  At 3.999 s no prune: the head A, though B is fuller; at 4 s the
    lookup prunes again: B, the fullest."""
    clock = VirtualClock()
    st, a, b = chain_of_two(clock)
    clock.now = 2.0
    assert st.search(LO, HI, MPS) == a
    st.append(a)
    st.remove(a)
    st.remove(a)
    st.append(b)
    st.append(b)
    clock.now = 3.999
    assert st.search(LO, HI, MPS) == a
    clock.now = 4.0
    assert st.search(LO, HI, MPS) == b


def test_a_dup_with_room_for_only_this_mapping_stays_in_place() -> None:
    """[B, A] with A=3 and B=1 at 2 s: the pruning lookup takes A, but 3 + 1 < 4 fails,
    so A is not moved; A gets its 4th mapping (full).  The next lookups (no prune) take
    B from the head.  rooms() before says the same order: A (1 room), then B (3)."""
    clock = VirtualClock()
    st, a, b = chain_of_two(clock)
    st.append(a)  # A=3
    clock.now = 2.0
    assert st.rooms(LO, HI, MPS) == [(a, 1), (b, 3)]
    assert st.search(LO, HI, MPS) == a
    st.append(a)
    assert st.search(LO, HI, MPS) == b


def test_rooms_follow_the_list_order_without_prune_and_fullness_with_it() -> None:
    """rooms(): the order repeated lookups would fill the dups in.  At 1 s (no prune):
    B (head) first, then A; with stable_node_chains_prune_millisecs 0 every lookup
    prunes: A (the fullest) first."""
    clock = VirtualClock()
    st, a, b = chain_of_two(clock)
    clock.now = 1.0
    assert st.rooms(LO, HI, MPS) == [(b, 3), (a, 2)]
    st.prune_clock = lambda: (clock(), 0)
    assert st.rooms(LO, HI, MPS) == [(a, 2), (b, 3)]


# -- the collapse of a chain left with one dup -------------------------------------------


def chain_of_one(full: bool) -> tuple[StableTree, int]:
    """A full (4 mappings), then B chained beside it with 1 mapping: [B, A].  When not
    `full`, A loses 2 (A=2).  B then loses its mapping and goes: the chain [A] of one
    dup, A full (1 KSM page, 3 sharing) or not (1, 1); 1 chain, 1 dup."""
    st = StableTree()
    a = st.insert(LO, HI)
    for _ in range(MPS):
        st.append(a)
    b = st.insert(LO, HI)
    st.append(b)
    if not full:
        st.remove(a)
        st.remove(a)
    st.remove(b)
    assert counters(st) == ((1, 3, 1, 1) if full else (1, 1, 1, 1))
    assert st.singular == 1
    return st, a


def test_a_walk_collapses_a_chain_left_with_a_full_dup() -> None:
    """stable_node_dup() finds A alone in the hlist: rb_replace_node(), chains 1 -> 0,
    dups 1 -> 0; the KSM page and its mappings stay (1, 3).  A is full: a lookup finds
    no room (stable_tree_search() returns NULL on a full plain node), and the next
    stable_tree_insert() meets a plain node (need_chain): alloc_stable_node_chain()
    makes a chain again, A its first dup, C at the head - 1 chain, 2 dups.  C's two
    mappings: 2 KSM pages, 4 sharing."""
    st, a = chain_of_one(full=True)
    assert st.walked() == 1
    assert counters(st) == (1, 3, 0, 0)
    assert st.singular == 0
    assert st.search(LO, HI, MPS) == -1
    c = st.insert(LO, HI)
    assert counters(st) == (1, 3, 1, 2)
    st.append(c)
    st.append(c)
    assert counters(st) == (2, 4, 1, 2)
    assert st.walked() == 0  # two dups: nothing to collapse


def test_a_walk_collapses_a_chain_left_with_a_dup_with_room() -> None:
    """A (2 of 4) alone in the chain: the walk collapses it (1, 1, 0, 0), and A is then
    an ordinary stable node with room: the next lookup finds it, a mapping joins (2)."""
    st, a = chain_of_one(full=False)
    assert st.walked() == 1
    assert counters(st) == (1, 1, 0, 0)
    assert st.search(LO, HI, MPS) == a
    st.append(a)
    assert counters(st) == (1, 2, 0, 0)


def test_only_a_walk_after_the_removal_collapses() -> None:
    """Positions in a chunk: page i's removal is at 2i (remove_rmap_item_from_tree()
    comes first in mainline's cmp_and_merge_page()), its walk at 2i + 1.  B's last
    mapping leaves at page 3 (position 6): the walk of page 2 (5) came before - the
    chain stays; page 3's own walk (7) collapses it."""
    st = StableTree()
    a = st.insert(LO, HI)
    st.append(a)
    st.append(a)
    b = st.insert(LO, HI)
    st.append(b)
    st.at = 6
    st.remove(b)
    st.at = -1
    assert counters(st) == (1, 1, 1, 1)
    assert st.walked(5) == 0
    assert counters(st) == (1, 1, 1, 1)
    assert st.walked(7) == 1
    assert counters(st) == (1, 1, 0, 0)


def test_a_chain_left_after_the_last_walk_of_a_chunk_collapses_at_the_next_chunks_first() -> None:
    """B goes at position 6; the chunk's last walk was at 5: chunk_done(5) leaves the
    chain, now dated before the next chunk (-1), whose first walk (1) collapses it."""
    st = StableTree()
    a = st.insert(LO, HI)
    st.append(a)
    st.append(a)
    b = st.insert(LO, HI)
    st.append(b)
    st.at = 6
    st.remove(b)
    st.at = -1
    st.chunk_done(5)
    assert counters(st) == (1, 1, 1, 1)
    st.chunk_done(None)  # a chunk with no walk
    assert counters(st) == (1, 1, 1, 1)
    st.chunk_done(1)
    assert counters(st) == (1, 1, 0, 0)


def test_an_insert_into_a_chain_left_with_one_dup_keeps_it_a_chain() -> None:
    """stable_tree_insert()'s chain() collapses [A] and need_chain makes a chain again:
    in all, a chain of 2 dups (C at the head), nothing left to collapse."""
    st, _ = chain_of_one(full=True)
    st.insert(LO, HI)
    assert counters(st) == (1, 3, 1, 2)
    assert st.singular == 0
    assert st.walked() == 0


def test_linux_5_4_prunes_only_onto_a_dup_with_room() -> None:
    """prune_chains() (LKSM's 5.4 stable_node_dup(): prune && nr == 1 && a sharing
    candidate found): A full stays a chain of one dup; once A loses a mapping (3 of 4)
    it collapses."""
    st, a = chain_of_one(full=True)
    st.prune_chains(MPS)
    assert counters(st) == (1, 3, 1, 1)
    st.remove(a)
    st.prune_chains(MPS)
    assert counters(st) == (1, 2, 0, 0)


# -- mainline ksmd: the collapse at the next walk, on processes ----------------------------


def mergeable(src: FakeSource, name: str, pages: list[bytes]) -> TaskId:
    """A process with one VM_MERGEABLE anonymous mapping holding `pages`."""
    m = Mapping(0x10000000, 0x10000000 + len(pages) * PAGE_SIZE, vm_mergeable=True)
    return src.add(name, [(m, dict(enumerate(pages)))])


def chain_counts(ksm: Ksm) -> tuple[int, int, int, int]:
    c = ksm.counters()
    return c["stable_node_chains"], c["stable_node_dups"], c["pages_shared"], c["pages_sharing"]


def test_mainline_collapses_a_chain_left_with_a_full_dup_at_the_next_walk() -> None:
    """max_page_sharing 2; p0..p3 hold a page `q` and a page of their own.  Pass 1: all
    volatile.  Pass 2 pairs p0's and p1's q into A (full), p2's and p3's into B
    (stable_tree_insert() chains it): 1 chain, 2 dups, 2 KSM pages, 2 sharing; the own
    pages wait unshared.  p2 and p3 exit: their items go first thing in pass 3, A is left
    alone - full.  p0's own page passes the checksum gate and walks the stable tree:
    stable_node_dup() collapses the chain (LKSM's 5.4 rule would keep it: A has no
    room).  p1 exits: A keeps one mapping (1 KSM page, 0 sharing)."""
    src = FakeSource()
    ps = [mergeable(src, f"p{i}", [fill("q"), unique(i + 1)]) for i in range(4)]
    ksm = Ksm(src, policy="ksm")
    ksm.tunables.max_page_sharing = 2
    ksm.tunables.smart_scan = 0
    ksm.full_scan()
    ksm.full_scan()
    assert chain_counts(ksm) == (1, 2, 2, 2)
    assert ksm.counters()["pages_unshared"] == 4
    src.kill(ps[2])
    src.kill(ps[3])
    ksm.full_scan()
    assert chain_counts(ksm) == (0, 0, 1, 1)
    src.kill(ps[1])
    ksm.full_scan()
    assert chain_counts(ksm) == (0, 0, 1, 0)


def test_mainline_keeps_the_chain_while_nothing_walks_the_tree() -> None:
    """The same without pages of their own: after p2 and p3 exit, p0's and p1's pages are
    KSM pages (cmp_and_merge_page() returns at once): no walk, the chain of one dup stays
    pass after pass.  p0 then maps a new page of its own: its first visit fails the
    checksum gate (no walk), its second walks the tree - with content unlike q - and
    the chain collapses."""
    src = FakeSource()
    ps = [mergeable(src, f"p{i}", [fill("q")]) for i in range(4)]
    ksm = Ksm(src, policy="ksm")
    ksm.tunables.max_page_sharing = 2
    ksm.tunables.smart_scan = 0
    ksm.full_scan()
    ksm.full_scan()
    assert chain_counts(ksm) == (1, 2, 2, 2)
    src.kill(ps[2])
    src.kill(ps[3])
    for _ in range(3):
        ksm.full_scan()
        assert chain_counts(ksm) == (1, 1, 1, 1)
    src.procs[ps[0]].vmas[0].mapping = Mapping(0x10000000, 0x10000000 + 2 * PAGE_SIZE, vm_mergeable=True)
    src.set_page(ps[0], 0, 1, unique(9))
    ksm.full_scan()
    assert chain_counts(ksm) == (1, 1, 1, 1)
    ksm.full_scan()
    assert chain_counts(ksm) == (0, 0, 1, 1)
