"""`--policy ksm` against the kernel's own ksmd, on the same stopped processes.

Three answers must agree, phase after phase: the hand derivation from the pages the
processes hold, the kernel's ksmd run to convergence, and lksmfs's mainline policy
(`lksmfs.commands.scan.scan_processes(policy="ksm")`) - on pages_shared, pages_sharing,
pages_unshared and pages_volatile, and with smart_scan on pages_skipped at every full
scan.  The kernel's counters are read with ksmd stopped at a pass boundary
(KernelKsm.stopped_counters: mid-pass an item between two unstable trees reads as
volatile).

Two scopes: processes that madvise(MADV_MERGEABLE) only their pattern mapping - a second
mapping with the very same pages stays out of KSM, and so does the Python runtime, so
every counter follows from the pattern alone - and processes that called
prctl(PR_SET_MEMORY_MERGE), whose runtime pages count too (census, as in
test_kernel_oracle.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import pytest

from lksmfs.commands.scan import scan_processes
from testkit.kernel_ksm import KernelKsm, anon_page_census
from testkit.memproc import PatternGroup
from testkit.patterns import Pages, expected_counts, pattern_page, spec_groups

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

N = 64
PASS_GAP_MS = 20  # ksmd's sleep between passes (each batch is a whole pass here)
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")

# LTP ksm01's four phases (three processes, one letter each, then one page 'e'), then
# mixed contents: zero pages, 'same' pages (pairs across two processes), unique pages.
PHASES: tuple[tuple[Pages, ...], ...] = (
    (((N, "c"),), ((N, "a"),), ((N, "a"),)),
    (((N, "c"),), ((N, "b"),), ((N, "a"),)),
    (((N, "d"),), ((N, "d"),), ((N, "d"),)),
    (((N, "d"),), ((N - 1, "d"), (1, "e")), ((N, "d"),)),
    (((32, "a"), (16, "zero"), (16, "same")), ((32, "a"), (16, "b"), (16, "same")), ((48, "b"), (16, "unique"))),
)


def four(groups: Iterable[int], unique: int, mps: int) -> tuple[int, int, int, int]:
    """(shared, sharing, unshared, volatile) ksmd converges to on groups of identical
    pages and `unique` pages alike to none: full KSM pages of mps mappings, then one of
    the rest if it has two or more; a lone page (alone, or left over by a group) waits in
    the unstable tree every pass; nothing stays volatile on still memory."""
    groups = list(groups)
    shared, sharing = expected_counts(groups, mps)
    lone = sum(1 for n in groups if n % mps == 1)
    return shared, sharing, lone + unique, 0


def by_hand(specs: tuple[Pages, ...], mps: int) -> tuple[int, int, int, int]:
    unique = sum(c for spec in specs for c, p in spec if p == "unique")
    return four(spec_groups(specs).values(), unique, mps)


# by hand, mps 256: c 64 + a 128            -> (2, 63 + 127, 0, 0)
#                   three groups of 64       -> (3, 189, 0, 0)
#                   d 192                    -> (1, 191, 0, 0)
#                   d 191, e alone           -> (1, 190, 1, 0)   (LTP: 1, N-2, 0, 1)
#                   a 64, zero 16, same 16 pairs, b 64, unique 16 -> (19, 157, 16, 0)
LITERAL_256 = ((2, 190, 0, 0), (3, 189, 0, 0), (1, 191, 0, 0), (1, 190, 1, 0), (19, 157, 16, 0))


@pytest.fixture
def kernel_ksm() -> Iterator[KernelKsm]:
    with KernelKsm() as k:
        yield k


def lksmfs_ksm(pids: list[int], mps: int, rounds: int = 3, smart_scan: int = 0) -> dict[str, object]:
    return scan_processes(pids=pids, rounds=rounds, policy="ksm", filter_enabled=False,
                          settings={"max_page_sharing": mps, "smart_scan": smart_scan, "use_zero_pages": 0})


@pytest.mark.parametrize("mps", [256, 2])
def test_madvised_processes_agree_with_the_kernel(kernel_ksm: KernelKsm, mps: int) -> None:
    """Only the madvised mapping is scanned: its twin with the same pages and the
    runtime never merge, in the kernel as in lksmfs."""
    # a pass of these few pages takes microseconds: sleep between passes, so that the
    # convergence check can read the counters at a pass boundary
    kernel_ksm.configure(max_page_sharing=mps, smart_scan=0, sleep_millisecs=PASS_GAP_MS)
    with PatternGroup(PHASES[0], scope="madvise") as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        for i, specs in enumerate(PHASES):
            if i:
                group.rewrite(specs)
            hand = by_hand(specs, mps)
            if mps == 256:
                assert hand == LITERAL_256[i], i
            kernel_ksm.converge(timeout_s=60)
            c = kernel_ksm.stopped_counters()
            kernel = tuple(c[k] for k in COUNTERS)
            assert c["pages_shared"] + c["pages_sharing"] == group.ksm_pages()  # smaps KSM:
            kernel_ksm.unmerge()
            lk = lksmfs_ksm(group.pids, mps)
            ours = tuple(lk[k] for k in COUNTERS)
            assert kernel == hand, f"phase {i}: kernel {kernel} != hand {hand}"
            assert ours == kernel, f"phase {i}: lksmfs {ours} != kernel {kernel}"
            assert lk["ksm_zero_pages"] == c["ksm_zero_pages"] == 0


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def test_prctl_processes_agree_with_the_kernel(kernel_ksm: KernelKsm) -> None:
    """The whole process is mergeable: the runtime's pages join the pattern's (census)."""
    kernel_ksm.configure(max_page_sharing=256, smart_scan=0, sleep_millisecs=PASS_GAP_MS)
    with PatternGroup(PHASES[0], scope="prctl") as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        for i, specs in enumerate(PHASES[:2]):
            if i:
                group.rewrite(specs)
            # every anonymous page of the processes, pattern included, grouped by content
            census = anon_page_census(group.pids)
            for key, count in spec_groups(specs).items():  # the pattern's groups are among them
                assert census[_digest(pattern_page(key))] >= count
            groups = [n for n in census.values() if n >= 2]
            alone = sum(1 for n in census.values() if n == 1)
            hand = four(groups, alone, 256)
            kernel_ksm.converge(timeout_s=60)
            kernel = tuple(kernel_ksm.stopped_counters()[k] for k in COUNTERS)
            kernel_ksm.unmerge()
            lk = lksmfs_ksm(group.pids, 256)
            ours = tuple(lk[k] for k in COUNTERS)
            assert kernel == hand, f"phase {i}: kernel {kernel} != census {hand}"
            assert ours == kernel, f"phase {i}: lksmfs {ours} != kernel {kernel}"


# should_skip_rmap_item(), visit v (1-based) seeing age v - 1: ages 0..2 are scanned;
# a scanned visit with no skips left grants skip_age(age) of them: visit 4 -> 1, 6 -> 2,
# 9 -> 4, 14 -> 8, 23 -> 8, ...  So a page that never merges is skipped at these visits:
SKIPPED = {5, 7, 8, 10, 11, 12, 13, *range(15, 23), *range(24, 32)}
PASSES = 30


@pytest.mark.parametrize("scope", ["madvise", "prctl"])
def test_smart_scan_pages_skipped_per_full_scan(kernel_ksm: KernelKsm, scope: str) -> None:
    """Every page that does not merge ages in step with the others (all rmap_items are
    made in pass 1), so a pass skips all of them or none: pages_skipped grows by that
    number at exactly the passes the rule says, in the kernel and in lksmfs."""
    specs = PHASES[4]
    kernel_ksm.configure(max_page_sharing=256, smart_scan=1, sleep_millisecs=100)
    with PatternGroup(specs, scope=scope) as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        kernel = kernel_ksm.per_pass(PASSES, ("pages_skipped", "pages_scanned"))
        c = kernel_ksm.counters()
        unmerged = c["pages_unshared"] + c["pages_volatile"]  # items that never merge
        if scope == "madvise":
            assert unmerged == by_hand(specs, 256)[2] == 16  # the 16 unique pages
        kernel_ksm.unmerge()
        lk = lksmfs_ksm(group.pids, 256, rounds=PASSES, smart_scan=1)
    skipped_kernel = [p["pages_skipped"] for p in kernel]
    skipped_ours = [s["counters"]["pages_skipped"] for s in lk["scans"]]  # type: ignore[union-attr]
    rule, total = [], 0
    for visit in range(1, PASSES + 1):
        total += unmerged if visit in SKIPPED else 0
        rule.append(total)
    assert skipped_kernel == rule
    assert skipped_ours == rule
    # a skipped page is visited but not scanned
    scanned_kernel = [p["pages_scanned"] for p in kernel]
    assert scanned_kernel[-1] == lk["pages_scanned"]
