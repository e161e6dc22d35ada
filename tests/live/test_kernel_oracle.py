"""The kernel's KSM as the oracle: stopped pattern processes, phase by phase (SPEC §5).

For every phase three numbers must agree on pages_shared / pages_sharing:

1. the hand derivation: group sizes of identical pages (the patterns, plus the runtime's own
   pages counted by `anon_page_census`) through `expected_counts` (max_page_sharing rule), and
   for patterns that cannot meet runtime pages, literal numbers worked out below;
2. the kernel's ksmd, run to convergence on the same stopped processes;
3. lksmfs (`lksmfs.commands.scan.scan_processes`) over the same pids with the same max_page_sharing.

Whole processes are compared, not the pattern mapping alone: PR_SET_MEMORY_MERGE makes the
runtime's pages mergeable too and the kernel only has global counters; lksmfs scans every anonymous
page of the given pids, so both see the same scope (see testkit/kernel_ksm.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lksmfs.commands.scan import scan_processes
from lksmfs.sources.procfs import THP_SPLIT_REMAPS_ZERO
from lksmfs.system.proc import PAGE_SIZE
from testkit.kernel_ksm import KernelKsm, anon_page_census
from testkit.memproc import PATTERN, PatternGroup
from testkit.patterns import Spec, expected_counts, pattern_page, spec_groups

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

N = 64  # pages per process in the LTP-style scenario


@dataclass(frozen=True)
class Phase:
    """Specs (one per process) and, where the patterns cannot meet runtime pages, the pattern's
    own contribution (shared, sharing) worked out by hand, per max_page_sharing."""

    specs: tuple[Spec, ...]
    literal: dict[int, tuple[int, int]]


# LTP ksm01-like: three processes, whole mapping of one letter each, changed phase by phase.
# Letters are never a whole runtime page, so the pattern adds exactly its own groups:
#   c,a,a   mps 1000: c 64 -> (1,63), a 128 -> (1,127)             = (2,190)
#           mps 2:    c -> 32 pairs (32,32), a -> 64 pairs (64,64)   = (96,96)
#   c,b,a   mps 1000: three groups of 64 -> 3 x (1,63)              = (3,189)
#           mps 2:    3 x (32,32)                                   = (96,96)
#   d,d,d   mps 1000: one group of 192                              = (1,191)
#           mps 2:    96 pairs                                      = (96,96)
#   d, 63d+e, d  mps 1000: 191 d -> (1,190), e alone                = (1,190)
#           mps 2:    95 pairs, one d left over, e alone            = (95,95)
LTP_PHASES = (
    Phase((((N, "c"),), ((N, "a"),), ((N, "a"),)), {1000: (2, 190), 2: (96, 96)}),
    Phase((((N, "c"),), ((N, "b"),), ((N, "a"),)), {1000: (3, 189), 2: (96, 96)}),
    Phase((((N, "d"),), ((N, "d"),), ((N, "d"),)), {1000: (1, 191), 2: (96, 96)}),
    Phase((((N, "d"),), ((N - 1, "d"), (1, "e")), ((N, "d"),)), {1000: (1, 190), 2: (95, 95)}),
)

# Mixed contents incl. zero, 'same' (pairs across processes) and unique pages; zero pages join the
# runtime's own zero-filled pages, so only the census-based derivation applies.  The non-zero part
# by hand (mps 3):
#   phase 0: a 64 -> 21 full nodes + 1 left (21,42); b 64 -> same (21,42);
#            'same' at pages 48..63 of processes 0 and 1: 16 pairs (16,16)  = (58,100) + zero group
#   phase 1: a 48 -> 16 full nodes (16,32)                                 = (16,32) + zero group
MIXED_PHASES = (
    Phase(
        (
            ((32, "a"), (16, "zero"), (16, "same")),
            ((32, "a"), (16, "b"), (16, "same")),
            ((48, "b"), (16, "unique")),
        ),
        {},
    ),
    Phase(
        (
            ((64, "unique"),),
            ((32, "a"), (32, "zero")),
            ((16, "a"), (48, "zero")),
        ),
        {},
    ),
    Phase((((64, "unique"),), ((64, "unique"),), ((64, "unique"),)), {}),
)

SCENARIOS = {"ltp": LTP_PHASES, "mixed": MIXED_PHASES}
CASES = [("ltp", 1000), ("ltp", 2), ("mixed", 1000), ("mixed", 3)]


def _patterns(group: PatternGroup) -> dict[int, tuple[int, int]]:
    """Each child's pattern mapping as a byte range, for anon_page_census to leave out."""
    return {p.pid: (p.addr(PATTERN), p.addr(PATTERN) + p.npages(PATTERN) * PAGE_SIZE) for p in group.procs}


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class PhaseResult:
    expected: tuple[int, int]
    background: tuple[int, int]
    kernel: tuple[int, int]
    pattern_ksm_pages: int
    expected_pattern_ksm_pages: int
    lksmfs: tuple[int, int] | None


@pytest.fixture
def kernel_ksm() -> Iterator[KernelKsm]:
    with KernelKsm() as k:
        yield k


def run_phases(
    k: KernelKsm, phases: tuple[Phase, ...], mps: int, with_lksmfs: bool
) -> list[PhaseResult]:
    """Start the children, and for each phase: census, kernel to convergence, unmerge, lksmfs."""
    k.configure(max_page_sharing=mps, use_zero_pages=0)
    results = []
    with PatternGroup(phases[0].specs) as group:
        foreign = k.foreign_mergeable(group.pids)
        assert not foreign, f"other mergeable processes {foreign} would skew the global counters"
        for i, phase in enumerate(phases):
            if i:
                group.rewrite(phase.specs)
            runtime = anon_page_census(group.pids, _patterns(group))
            combined = dict(runtime)
            pattern_sizes = spec_groups(phase.specs)
            for gkey, count in pattern_sizes.items():
                key = _digest(pattern_page(gkey))
                combined[key] = combined.get(key, 0) + count
            expected = expected_counts(combined.values(), mps)
            background = expected_counts(runtime.values(), mps)
            # pattern pages the kernel should report merged inside the pattern mappings
            # (exact only when no group is cut by max_page_sharing)
            pattern_merged = sum(
                count
                for gkey, count in pattern_sizes.items()
                if combined[_digest(pattern_page(gkey))] >= 2
            )
            conv = k.converge(timeout_s=60)
            kernel = (conv.counters["pages_shared"], conv.counters["pages_sharing"])
            ksm_pages = group.ksm_pages()
            k.unmerge()
            lk = None
            if with_lksmfs:
                c = scan_processes(
                    pids=group.pids,
                    rounds=3,
                    settings={"max_page_sharing": mps, "use_zero_pages": 0},
                    filter_enabled=False,
                )
                lk = (c["pages_shared"], c["pages_sharing"])
            results.append(PhaseResult(expected, background, kernel, ksm_pages, pattern_merged, lk))
    return results


@pytest.mark.parametrize(("scenario", "mps"), CASES, ids=[f"{s}-mps{m}" for s, m in CASES])
def test_kernel_matches_hand_derivation(kernel_ksm: KernelKsm, scenario: str, mps: int) -> None:
    """The kernel's converged counters are what the page census + max_page_sharing rule say."""
    phases = SCENARIOS[scenario]
    results = run_phases(kernel_ksm, phases, mps, with_lksmfs=False)
    for i, (phase, r) in enumerate(zip(phases, results, strict=True)):
        assert r.kernel == r.expected, f"phase {i}: kernel {r.kernel} != hand {r.expected}"
        if mps in phase.literal:
            delta = (r.expected[0] - r.background[0], r.expected[1] - r.background[1])
            assert delta == phase.literal[mps], f"phase {i}: pattern part {delta}"
        if mps >= 1000:
            assert r.pattern_ksm_pages == r.expected_pattern_ksm_pages, f"phase {i}: smaps KSM"


def test_background_is_small_and_merges(kernel_ksm: KernelKsm) -> None:
    """The runtime background is real but small next to the patterns (sanity for the benches)."""
    (r,) = run_phases(kernel_ksm, (MIXED_PHASES[2],), 1000, with_lksmfs=False)
    assert r.kernel == r.expected
    assert r.kernel == r.background  # all-unique patterns add nothing
    assert 0 < r.kernel[1] < 1000


@pytest.mark.parametrize(("scenario", "mps"), CASES, ids=[f"{s}-mps{m}" for s, m in CASES])
def test_lksmfs_matches_kernel(kernel_ksm: KernelKsm, scenario: str, mps: int) -> None:
    """lksmfs over the same stopped pids reports the kernel's pages_shared/pages_sharing."""
    phases = SCENARIOS[scenario]
    results = run_phases(kernel_ksm, phases, mps, with_lksmfs=True)
    for i, r in enumerate(results):
        assert r.kernel == r.expected, f"phase {i}: kernel {r.kernel} != hand {r.expected}"
        assert r.lksmfs == r.kernel, f"phase {i}: lksmfs {r.lksmfs} != kernel {r.kernel}"


# use_zero_pages=1: zero-filled pages go to the zero page (ksm_zero_pages), outside the
# stable tree.  By hand: ksm_zero_pages = every zero-filled anonymous page (the pattern's
# 16 + 16 plus the runtime's own, from the census); pages_shared/pages_sharing = the
# max_page_sharing rule over every other content group.
ZERO_SPECS = (
    ((32, "a"), (16, "zero"), (16, "same")),
    ((32, "a"), (16, "b"), (16, "same")),
    ((48, "b"), (16, "zero")),
)


@pytest.mark.parametrize("mps", [1000, 3])
def test_lksmfs_matches_kernel_with_use_zero_pages(kernel_ksm: KernelKsm, mps: int) -> None:
    zero_key = _digest(bytes(4096))
    kernel_ksm.configure(max_page_sharing=mps, use_zero_pages=1)
    with PatternGroup(ZERO_SPECS) as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        runtime = anon_page_census(group.pids, _patterns(group))
        combined = dict(runtime)
        for gkey, count in spec_groups(ZERO_SPECS).items():
            key = _digest(pattern_page(gkey))
            combined[key] = combined.get(key, 0) + count
        zero_pages = combined.pop(zero_key, 0)
        assert zero_pages >= 32
        expected = (*expected_counts(combined.values(), mps), zero_pages)

        c = kernel_ksm.converge(timeout_s=60).counters
        kernel = (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"])
        kernel_ksm.unmerge()
        lk = scan_processes(
            pids=group.pids, rounds=3, settings={"max_page_sharing": mps, "use_zero_pages": 1},
            filter_enabled=False,
        )
        lksmfs = (lk["pages_shared"], lk["pages_sharing"], lk["ksm_zero_pages"])
    assert kernel == expected, f"kernel {kernel} != hand {expected}"
    assert lksmfs == kernel, f"lksmfs {lksmfs} != kernel {kernel}"


# Transparent huge pages (lksmfs.engine.thp).  Each process: one 2 MiB huge page, 'a'
# then 511 zero-filled pages.  By hand, on Linux 6.12 and later, whatever the order: a merge attempt in each huge
# page comes before any of its zero pages merges (two zero pages of one huge page cannot
# merge with each other; one that finds a KSM page or a partner elsewhere splits its huge
# page first and is itself the zero page then), so every pattern zero page becomes the
# shared zero page, out of KSM's reach; the two 'a' pages make one KSM page.  What merges
# is the runtime's pages plus that pair.
THP_SPECS = (((1, "a"), (511, "zero")), ((1, "a"), (511, "zero")))


def _huge_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("AnonHugePages:"))


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_lksmfs_matches_kernel_on_transparent_huge_pages(kernel_ksm: KernelKsm, use_zero_pages: int) -> None:
    """lksmfs first (it splits nothing for real), then the kernel on the same pages."""
    mps = 256
    kernel_ksm.configure(max_page_sharing=mps, use_zero_pages=use_zero_pages)
    with PatternGroup(THP_SPECS, thp=True) as group:
        assert not kernel_ksm.foreign_mergeable(group.pids)
        huge = [_huge_kb(pid) for pid in group.pids]
        if min(huge) < 2048:
            pytest.skip(f"the kernel gave the pattern no huge page (AnonHugePages {huge} kB)")
        runtime = anon_page_census(group.pids, _patterns(group))
        lk = scan_processes(pids=group.pids, rounds=4, filter_enabled=False,
                            settings={"max_page_sharing": mps, "use_zero_pages": use_zero_pages})
        c = kernel_ksm.converge(timeout_s=60).counters
        kernel_ksm.unmerge()
    keys = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups", "ksm_zero_pages")
    kernel = tuple(c[k] for k in keys)
    lksmfs = tuple(lk[k] for k in keys)
    assert lksmfs == kernel, f"lksmfs {lksmfs} != kernel {kernel}"
    assert lk["thp_pages"] == 1024
    if max(huge) == 2048 and THP_SPLIT_REMAPS_ZERO:  # no huge page in the runtime: the census says what merges
        groups = dict(runtime)
        key = _digest(pattern_page(ord("a")))
        groups[key] = groups.get(key, 0) + 2
        zero = groups.pop(_digest(bytes(PAGE_SIZE)), 0) if use_zero_pages else 0
        assert (c["pages_shared"], c["pages_sharing"]) == expected_counts(groups.values(), mps)
        assert c["ksm_zero_pages"] == zero
