"""The grouped merge path gives exactly what the page-at-a-time path gives (issue 10).

Two engines scan the same randomized memory - many duplicates, zero pages, small
max_page_sharing (chains), LKSM_FILTER regions (libraries mapped once or twice, with
bss, of sizes that conflict), frozen tasks, exits and rewrites - one settling chunks
of many pages, across VMAs, content by content (the default), the other reading one
page at a time and sending it through cmp_and_merge_page(): the seed's own order,
every page merged before the scanner walks on; chunks larger than READ_BLOCK keep only
their pages' digests, and comparisons read again what they need.  After every scan
their counters, chains and region_share must be equal.  Two variants make the grouped path's fallbacks happen: a
weak digest (only a page's first 8 bytes), so that different contents collide, and a
source that rewrites an already scanned page while another process is being read, so
that an unstable tree partner no longer matches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from memfake import FakeSource, fill, unique

import lksmfs.engine.scanner as scanner_mod
import lksmfs.engine.thp as thp
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.merge import Merger
from lksmfs.engine.pages import XXH3, Digest
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId

F = (1, 100)
LIBS = {"F": (F, "/lib/libF.so"), "G": ((1, 200), "/lib/libG.so")}
PALETTE = [bytes(PAGE_SIZE), fill("a"), fill("b"), fill("c"), unique(1), unique(2)]
# two contents whose first 8 bytes agree: they collide under the weak digest
PALETTE.append(fill("a")[:8] + fill("z")[8:])
DISTINCT = len(PALETTE)  # a content no other page has (a library's data that never merges)


def page(c: int, p: int, v: int, o: int) -> bytes:
    """Content `c` of the palette, or for DISTINCT one of page `o` of mapping `v` of process `p` alone."""
    return PALETTE[c] if c < DISTINCT else unique(1000 + (p * 16 + v) * 4096 + o)


def weak_digest(data: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Only the first 8 bytes of each page: collisions on purpose."""
    words = np.frombuffer(bytes(data), dtype=np.uint64).reshape(n, PAGE_SIZE // 8)
    return words[:, 0].copy(), np.zeros(n, dtype=np.uint64)


# the zero page is told by its weak digest too (no palette page but the zero page starts
# with 8 zeros): a THP split, use_zero_pages and the merger all see it as the scanner does
WEAK = Digest(weak_digest)


class RewritingSource(FakeSource):
    """When the scanner starts on task B (its first present_anon of a scan), page 0 of
    an earlier task is rewritten: a partner in the unstable tree that no longer matches.
    (Not on a read: a task that did not run is not read at all with cpu_marks.)"""

    def __init__(self) -> None:
        super().__init__()
        self.rewrites: dict[TaskId, tuple[TaskId, bytes]] = {}
        self.read_once: set[TaskId] = set()

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        if task not in self.read_once:
            self.read_once.add(task)
            if task in self.rewrites:
                victim, content = self.rewrites[task]
                if victim in self.procs and 0 in self.procs[victim].vmas[0].pages:
                    self.procs[victim].vmas[0].pages[0] = content
                    self.procs[victim].faults += 1  # the victim wrote: it ran (cpu_mark moves)
        return super().present_anon(task, start_vpn, end_vpn)


def build(spec: dict[str, Any]) -> tuple[RewritingSource, list[TaskId]]:
    src = RewritingSource()
    tasks = []
    for p, (anon, data) in enumerate(spec["procs"]):
        base = 0x1000000 * (p + 1)
        vmas = [(Mapping(base, base + 64 * PAGE_SIZE), {o: page(c, p, 0, o) for o, c in enumerate(anon)})]
        if data:  # a library's .data: a file region for LKSM_FILTER
            vmas.append((Mapping(base + 128 * PAGE_SIZE, base + (128 + 80) * PAGE_SIZE, "rw-p", F, "/lib/libF.so"),
                         {o: page(c, p, 1, o) for o, c in enumerate(data)}))
        at = base + 256 * PAGE_SIZE
        for kind, npages, cs in spec["libs"][p] if p < len(spec["libs"]) else []:
            # more mappings: a library's data (F again: the same region; G: another), or
            # a bss after whatever precedes it
            file, path = LIBS.get(kind, (None, ""))
            vmas.append((Mapping(at, at + npages * PAGE_SIZE, "rw-p", file, path),
                         {o: page(c, p, len(vmas), o) for o, c in enumerate(cs) if o < npages}))
            at += (npages + 1) * PAGE_SIZE
        tasks.append(src.add(f"p{p}", vmas))
        if spec.get("thp"):  # the anonymous mapping in huge pages (of 8 pages here)
            src.make_huge(tasks[-1], 0)
    for b, (victim, content) in spec["rewrites"].items():
        if b < len(tasks) and victim < len(tasks):
            src.rewrites[tasks[b]] = (tasks[victim], page(content, victim, 0, 200))
    return src, tasks


contents = st.integers(0, DISTINCT)
# a library's data: often pages that never merge (until a late write)
lib_pages = st.one_of(st.lists(st.just(DISTINCT), max_size=20), st.lists(contents, max_size=20))
specs = st.fixed_dictionaries({
    "procs": st.lists(st.tuples(st.lists(contents, min_size=1, max_size=40),
                                st.lists(contents, max_size=20)), min_size=1, max_size=4),
    "libs": st.lists(st.lists(st.tuples(st.sampled_from(["F", "G", "bss"]), st.sampled_from([1, 30, 80, 100, 200]),
                                        lib_pages), max_size=4), max_size=4),
    "rewrites": st.dictionaries(st.integers(0, 3), st.tuples(st.integers(0, 3), contents), max_size=2),
    "mps": st.sampled_from([2, 3, 5, 256]),
    "zero": st.booleans(),
    "filter": st.booleans(),
    "frozen": st.lists(st.integers(0, 3), max_size=2),
    "chunk": st.sampled_from([1, 3, 8, 1024]),
    "block": st.sampled_from([1, 2, 256]),  # READ_BLOCK: chunks larger keep only digests
    "writes": st.lists(st.tuples(st.integers(0, 3), st.integers(0, 39), contents), max_size=8),
    "kill": st.one_of(st.none(), st.integers(0, 3)),
    # writes once the regions are mature: a region whose filter had no bit may get one
    # in the middle of a mapping (process, mapping, page, content)
    "late": st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5), st.integers(0, 20), contents), max_size=10),
    "thp": st.booleans(),
})


Result = list[tuple[dict[str, int], dict[str, int]]]

# G's data never merges; once its region is mature, page 2 gets the anonymous page's
# content: it merges, and the region's first bit filters G's pages 3-4 (and q's G
# mapping, walked next) in that very scan
FIRST_BIT = {"procs": [([1], []), ([2], [])], "libs": [[("G", 30, [DISTINCT] * 5)], [("G", 30, [DISTINCT] * 5)]],
             "rewrites": {}, "mps": 256, "zero": False, "filter": True, "frozen": [], "chunk": 1024,
             "block": 2, "writes": [], "kill": None, "late": [(0, 1, 2, 1)], "thp": False}


def page_by_page(spec: dict[str, Any], digest: Digest = XXH3) -> Result:
    """The reference: chunks of one page, each through cmp_and_merge_page()."""
    with pytest.MonkeyPatch.context() as mp:
        small_huge_pages(mp)
        mp.setattr(scanner_mod, "CHUNK", 1)
        return run(spec, grouped=False, digest=digest)


def small_huge_pages(mp: pytest.MonkeyPatch) -> None:
    """Huge pages of 8 pages (lksmfs.engine.thp): small mappings hold several."""
    mp.setattr(thp, "HPAGE_PMD_ORDER", 3)
    mp.setattr(thp, "HPAGE_PMD_NR", 8)


def run(spec: dict[str, Any], grouped: bool, cpu_marks: bool = False, digest: Digest = XXH3) -> Result:
    src, tasks = build(spec)
    src.cpu_marks = cpu_marks
    ksm = Ksm(src, filter_enabled=spec["filter"], digest=digest)
    ksm.merger = Merger(ksm, grouped=grouped)
    ksm.tunables.max_page_sharing = spec["mps"]
    ksm.tunables.use_zero_pages = int(spec["zero"])
    out = []
    for scan in range(8):  # regions mature after 5: the filter works in the last ones
        if scan == 1:
            for p in spec["frozen"]:
                if p < len(tasks):
                    ksm.hint(tasks[p], True)
        if scan == 3:  # rewrites between scans (pages present: offsets < the anon list)
            for p, off, content in spec["writes"]:
                if p < len(tasks) and tasks[p] in src.procs and off in src.procs[tasks[p]].vmas[0].pages:
                    src.set_page(tasks[p], 0, off, page(content, p, 0, off + 100))
            if spec["kill"] is not None and spec["kill"] < len(tasks):
                src.kill(tasks[spec["kill"]])
        if scan == 6:
            for p, v, off, content in spec["late"]:
                if p < len(tasks) and tasks[p] in src.procs and v < len(vmas := src.procs[tasks[p]].vmas) \
                        and off < vmas[v].mapping.npages:
                    src.set_page(tasks[p], v, off, page(content, p, v, off + 100))
        src.read_once.clear()
        ksm.full_scan()
        out.append((dict(ksm.counters()), dict(ksm.region_share())))
    return out


@pytest.mark.parametrize("digest", ["xxh3", "weak"])
@settings(max_examples=150, deadline=None)
@given(spec=specs)
@example(spec=FIRST_BIT)
def test_grouped_path_equals_page_by_page(spec: dict[str, Any], digest: str) -> None:
    grouped, expected = grouped_and_page_by_page(spec, digest, cpu_marks=False)
    assert grouped == expected


def grouped_and_page_by_page(spec: dict[str, Any], digest: str, cpu_marks: bool) -> tuple[Result, Result]:
    """The spec run by the grouped path (its chunk and read block sizes) and by the
    page-at-a-time reference, both with `digest` (xxh3, or the weak one)."""
    d = WEAK if digest == "weak" else XXH3  # given to both engines: nothing module-wide changes
    expected = page_by_page(spec, d)
    with pytest.MonkeyPatch.context() as mp:
        small_huge_pages(mp)
        mp.setattr(scanner_mod, "CHUNK", spec["chunk"])
        mp.setattr(scanner_mod, "READ_BLOCK", spec["block"])
        return run(spec, grouped=True, cpu_marks=cpu_marks, digest=d), expected


@pytest.mark.parametrize("digest", ["xxh3", "weak"])
@settings(max_examples=100, deadline=None)
@given(spec=specs)
@example(spec=FIRST_BIT)
def test_pages_of_a_task_that_did_not_run_are_not_read_again_and_nothing_changes(spec: dict[str, Any],
                                                                                 digest: str) -> None:
    """With a source that says when a task ran (cpu_mark), a task that did not run since
    its last scan has its pages' digests from then: the counters are the same as when
    every page is read every time."""
    grouped, expected = grouped_and_page_by_page(spec, digest, cpu_marks=True)
    assert grouped == expected


def test_a_chunk_of_identical_pages_fills_dups_then_pairs_new_ones() -> None:
    """10 pages of 'q' in one process, max_page_sharing 4, a frozen newcomer (no gate):
    page 1 waits in the unstable tree, page 2 merges with it (dup A: 2 mappings), pages
    3-4 fill A, page 5 waits, 6 pairs with it (dup B), 7-8 fill B, 9 waits, 10 pairs
    (dup C, 2 mappings): 3 KSM pages, 10 - 3 = 7 sharing, one chain of 3 dups."""
    src = FakeSource()
    t = src.anon("p", [fill("q")] * 10)
    ksm = Ksm(src)
    ksm.tunables.max_page_sharing = 4
    ksm.hint(t, True)
    ksm.full_scan()
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (3, 7, 0)
    assert (c["stable_node_chains"], c["stable_node_dups"]) == (1, 3)
    assert sorted(ksm.stable.nlen[:3].tolist()) == [2, 4, 4]
    assert ksm.last_scan["merged"] == 7


def test_a_stopped_task_is_read_again_only_where_pages_become_one() -> None:
    """Two processes that do not run, 300 pages of one content each: the first scan reads
    them all (checksums); the second reads none but the pages a new KSM page is made
    of (two per dup: 600 pages, max_page_sharing 256, so 3 dups: 6 pages), and counts
    exactly what reading everything counts; a third reads nothing at all.  Reading
    everything, a process's 300 pages are one chunk, more than a READ_BLOCK (64): they
    are read for their digests, and the 6 pages of the new KSM pages again to be compared."""
    counted = []
    for marks in (True, False):
        src = FakeSource()
        src.cpu_marks = marks
        for name in ("p", "q"):
            src.anon(name, [fill("z")] * 300)
        ksm = Ksm(src)
        pages = []
        for _ in range(3):
            before = src.pages_read
            ksm.full_scan()
            pages.append(src.pages_read - before)
        counted.append((ksm.counters()["pages_shared"], ksm.counters()["pages_sharing"]))
        if marks:
            assert pages == [600, 6, 0]
        else:
            assert pages == [600, 606, 600]
    assert counted[0] == counted[1] == (3, 597)


def test_use_zero_pages_settles_a_chunk_of_zero_pages_at_once() -> None:
    """1000 zero pages, use_zero_pages=1, frozen: every one goes to the zero page in the
    first scan, recorded in one step (ksm_zero_pages 1000, no KSM page)."""
    src = FakeSource()
    t = src.anon("p", [bytes(PAGE_SIZE)] * 1000)
    ksm = Ksm(src)
    ksm.tunables.use_zero_pages = 1
    ksm.hint(t, True)
    ksm.full_scan()
    c = ksm.counters()
    assert (c["ksm_zero_pages"], c["pages_shared"], c["pages_volatile"]) == (1000, 0, 1000)
    assert ksm.slots[t].zero_vpns.shape[0] == 1000
