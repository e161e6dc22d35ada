"""A max_page_sharing chain left with one dup, against the kernel's own ksmd.

Mainline's stable_node_dup() (6.11+) collapses a chain whose dup is alone in its hlist
(hlist_is_singular_node()) back into a plain stable node at any walk of the stable tree
that reaches it - ksm_stable_node_chains--, ksm_stable_node_dups-- - whether that dup is
full or not.  Linux 5.4 did it only onto a dup with room.

Three processes madvise one mapping: two `a` pages and two unique pages each.  Under
max_page_sharing 2 the `a` pages make a chain of three full dups, one per process (a
pass pairs them in scan order); under 3, a chain of two: P1's pair plus P2's first,
then P2's second plus P3's pair.  P2 and P3 then rewrite their whole mapping with unique
pages: every dup but P1's loses its mappings and goes, and P1's is left alone - full
(2 of 2) or with room (2 of 3).  The unique pages walk the stable tree every pass (they
wait in the unstable tree), the chain is the tree's root: the kernel collapses it.
Then P3 writes two `a` pages again: a lookup meets the collapsed node - full, the two
pages merge with each other and stable_tree_insert() makes a chain again (2 dups); with
room, one joins it and the other waits alone.

Both the kernel and lksmfs's mainline engine (policy `ksm`, on the same processes, its
state kept from phase to phase as the kernel's is) run each phase to convergence; their
counters must equal each other and the hand derivation.  (Pass by pass they may differ
right after a rewrite: the kernel drops a dup whose page was freed as soon as a walk
meets it, lksmfs when its scan reads the rewritten pages.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.sysfs.attrs import AttributeTable, apply_settings
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PATTERN, PatternGroup

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

PASS_GAP_MS = 50  # ksmd's sleep between passes (each batch is a whole pass here)
KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "stable_node_chains",
        "stable_node_dups")
START = [(2, "a"), (2, "unique")]
PAGES = 3 * 4  # rmap_items: every page of the three madvised mappings

# (shared, sharing, unshared, volatile, chains, dups) after each phase, by hand:
EXPECTED = {
    # mps 2: a = 3 full dups (P1, P2, P3), 6 unique waiting
    #        P2, P3 unique: P1's dup alone and full -> collapsed; 2 + 4 + 4 unique
    #        P3 writes a, a: the full node has no room, they pair into a new dup: a
    #        chain of 2 again; 2 + 4 + 2 unique
    2: ((3, 3, 6, 0, 1, 3), (1, 1, 10, 0, 0, 0), (2, 2, 8, 0, 1, 2)),
    # mps 3: a = dups of 3 (P1 a, a + P2 a) and (P2 a + P3 a, a), 6 unique
    #        P2, P3 unique: P1's dup alone, 2 of 3 -> collapsed; 10 unique
    #        P3 writes a, a: the first joins P1's node (full), the second waits alone;
    #        2 + 4 + 2 unique + 1
    3: ((2, 4, 6, 0, 1, 2), (1, 1, 10, 0, 0, 0), (1, 2, 9, 0, 0, 0)),
}


@pytest.fixture
def kernel_ksm() -> Iterator[KernelKsm]:
    with KernelKsm() as k:
        yield k


def kernel_converged(k: KernelKsm) -> tuple[int, ...]:
    """ksmd to convergence (KernelKsm.converge), then stopped at a pass boundary."""
    k.converge(timeout_s=60)
    c = k.stopped_counters()
    got = tuple(c[x] for x in KEYS)
    assert sum(got[:4]) == PAGES, f"the kernel has rmap_items beyond ours (another KSM user?): {c}"
    return got


def lksmfs_converged(ksm: Ksm, min_passes: int = 3, same: int = 3, limit: int = 30) -> tuple[int, ...]:
    """Full passes until the counters are the same `same` passes running (at least
    `min_passes` passes); at most `limit`."""
    seen: list[tuple[int, ...]] = []
    for _ in range(limit):
        ksm.full_scan()
        c = ksm.counters()
        seen.append(tuple(int(c[x]) for x in KEYS))
        if len(seen) >= min_passes and len(set(seen[-same:])) == 1:
            return seen[-1]
    raise AssertionError(f"lksmfs did not converge in {limit} passes: {seen}")


@pytest.mark.parametrize("mps", [2, 3], ids=["full-dup", "dup-with-room"])
def test_a_chain_left_with_one_dup_collapses_as_in_the_kernel(kernel_ksm: KernelKsm, mps: int) -> None:
    kernel_ksm.configure(max_page_sharing=mps, smart_scan=0, use_zero_pages=0, sleep_millisecs=PASS_GAP_MS)
    with PatternGroup([START, START, START], scope="madvise") as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        p1, p2, p3 = group.procs
        with ProcfsSource(scope=Scope(pids=set(group.pids))) as source:
            ksm = Ksm(source, filter_enabled=False, self_pid=source.self_pid, short_task_ms=0, policy="ksm")
            apply_settings(AttributeTable(ksm), {"max_page_sharing": mps, "smart_scan": 0, "use_zero_pages": 0})
            phases = [
                lambda: None,
                lambda: (p2.rewrite(PATTERN, [(4, "unique")]), p3.rewrite(PATTERN, [(4, "unique")])),
                lambda: p3.rewrite(PATTERN, [(2, "a"), (2, "unique")]),
            ]
            for i, (change, hand) in enumerate(zip(phases, EXPECTED[mps], strict=True)):
                change()  # ksmd is stopped (at a pass boundary) whenever memory changes
                kernel = kernel_converged(kernel_ksm)
                ours = lksmfs_converged(ksm)
                assert kernel == hand, f"phase {i}: kernel {kernel} != hand {hand}"
                assert ours == kernel, f"phase {i}: lksmfs {ours} != kernel {kernel}"
