"""stable_node_dup() (mm/ksm.c) in the engine's StableTree, on a virtual clock.

A chain's dups are an hlist: stable_node_chain_add_dup() adds a new dup at the head,
alloc_stable_node_chain() stamps chain_prune_time.  A lookup from stable_tree_search()
(chain_prune()) prunes only once stable_node_chains_prune_millisecs have passed since
chain_prune_time (and stamps it again): then it takes the fullest dup with room, else the
first dup with room from the head.  The dup found moves to the head when it can take one
more mapping after this one.  Expected values below are worked by hand from those rules.
"""

from __future__ import annotations

from lksmfs.engine.stable import StableTree
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
