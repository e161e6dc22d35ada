"""LKSM_FILTER: regions, region_share, maturity, the seed's corner rules."""

from __future__ import annotations

from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.regions import RegionTable, RegionType
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId

F = (1, 100)  # libF: data (8 pages) + bss (4 pages)
G = (1, 200)  # libG: data (3 pages) that never merges


def process(src: FakeSource, name: str, base: int, tag: int) -> TaskId:
    """text/data of F, F's bss right after, text/data of G, [heap], [stack]."""
    P = PAGE_SIZE
    b = base
    maps = [
        (Mapping(b, b + 4 * P, "r-xp", F, "/lib/libF.so", has_anon=False), {}),
        (Mapping(b + 4 * P, b + 12 * P, "rw-p", F, "/lib/libF.so"),
         {**{o: fill(0x41 + o) for o in range(4)}, **{o: unique(tag * 100 + o) for o in range(4, 8)}}),
        (Mapping(b + 12 * P, b + 16 * P, "rw-p"),
         {0: fill("z"), **{o: unique(tag * 100 + 10 + o) for o in range(1, 4)}}),
        (Mapping(b + 20 * P, b + 22 * P, "r-xp", G, "/lib/libG.so", has_anon=False), {}),
        (Mapping(b + 22 * P, b + 25 * P, "rw-p", G, "/lib/libG.so"),
         {o: unique(tag * 100 + 20 + o) for o in range(3)}),
        (Mapping(b + 40 * P, b + 44 * P, "rw-p", None, "[heap]"),
         {0: fill("h"), 1: fill("i"), 2: unique(tag * 100 + 30), 3: unique(tag * 100 + 31)}),
        (Mapping(b + 60 * P, b + 62 * P, "rw-p", None, "[stack]"), {0: fill("s"), 1: unique(tag * 100 + 40)}),
    ]
    return src.add(name, maps)


def test_region_share_counts_every_append_by_region_type() -> None:
    src = FakeSource()
    process(src, "p", 0x10000000, 1)
    process(src, "q", 0x30000000, 2)  # another ASLR base: same offsets, other addresses
    ksm = Ksm(src)
    ksm.full_scan()
    ksm.full_scan()
    c = ksm.counters()
    # shared contents: data 0..3, bss 0, heap 0..1, stack 0: 8 KSM pages of 2 mappings
    assert (c["pages_shared"], c["pages_sharing"]) == (8, 8)
    # unique: data 4 + bss 3 + G 3 + heap 2 + stack 1 per process
    assert c["pages_unshared"] == 2 * 13
    # both mappings of a merge are counted; stack has no region (unknown): stack stays 0
    assert ksm.region_share() == {
        "heap": 4, "stack": 0, "file_data": 8, "file_bss": 2, "conflicted": 0, "unknown": 2,
    }
    # F's data region, F's bss region, G's data region
    assert c["nr_regions"] == 3


def scanned_per_scan(filter_enabled: bool, scans: int) -> tuple[list[int], Ksm]:
    src = FakeSource()
    process(src, "p", 0x10000000, 1)
    process(src, "q", 0x30000000, 2)
    ksm = Ksm(src, filter_enabled=filter_enabled)
    out = []
    for _ in range(scans):
        out.append(int(ksm.full_scan()["pages_scanned"]))
    return out, ksm


def test_mature_regions_scan_only_offsets_that_merged() -> None:
    # per process: F data 8 + F bss 4 + G data 3 + heap 4 + stack 2 = 21 present pages
    off, _ = scanned_per_scan(False, 7)
    assert off == [42] * 7
    on, ksm = scanned_per_scan(True, 7)
    # regions are born in crawl round 0 and mature once scan_round - 0 > 5: from the
    # 6th scan, F data scans offsets 0..3 (4 of 8), F bss offset 0 (1 of 4); G never
    # merged, so its filter is "skipped" (not usable) and it is scanned whole;
    # heap and stack are never filtered: 4 + 1 + 3 + 4 + 2 = 14 per process
    assert on == [42] * 5 + [28, 28]
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"]) == (8, 8)  # no sharing lost
    # the unique pages the filter passes over lose their rmap items (get_next_rmap_item)
    assert c["pages_unshared"] == 2 * (3 + 2 + 1)


def test_a_first_merge_in_a_mature_region_filters_the_rest_of_its_mapping() -> None:
    """__scan_next_rmap_item() consults the filter before every page: G never merged, so
    its mature region is lksm_region_skipped() and each page goes through - until p's G
    page 0, rewritten to the heap's 'h' (a KSM page since the first scans), merges and
    stable_tree_append_region() sets the region's first bit.  From p's next page on, G is
    filtered: p's G pages 1-2 are passed over, and so are q's, later in the same scan."""
    src = FakeSource()
    p = process(src, "p", 0x10000000, 1)
    process(src, "q", 0x30000000, 2)
    ksm = Ksm(src)
    for _ in range(6):
        ksm.full_scan()
    assert ksm.last_scan["pages_scanned"] == 28  # G still scanned whole (see above)
    assert ksm.region_share()["file_data"] == 8
    src.set_page(p, 4, 0, fill("h"))
    ksm.full_scan()
    # per process: F data 4 + F bss 1 + G page 0 + heap 4 + stack 2
    assert ksm.last_scan["pages_scanned"] == 2 * 12
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"]) == (8, 9)  # 'h': both heaps and p's G page 0
    # unique pages left: q's G page 0, the heaps' 2 and the stacks' 1 each
    assert c["pages_unshared"] == 1 + 2 * (2 + 1)
    assert ksm.region_share()["file_data"] == 9


def test_frozen_and_newcomer_slots_are_not_filtered() -> None:
    src = FakeSource()
    process(src, "p", 0x10000000, 1)
    q = process(src, "q", 0x30000000, 2)
    ksm = Ksm(src)
    for _ in range(6):
        ksm.full_scan()
    assert ksm.last_scan["pages_scanned"] == 28
    ksm.hint(q, True)  # q is listed and scanned: it becomes FROZEN and is queued
    assert ksm.partial_scan()["pages_scanned"] == 21
    late = process(src, "r", 0x50000000, 3)
    r = ksm.partial_scan()
    assert late in ksm.slots and r["pages_scanned"] == 21


def test_second_size_change_conflicts_the_region() -> None:
    """R is created by p (100 pages: 2 words).  In the same scan q (200 pages: 4 words)
    resizes it, then s (100 pages again) is the second change: conflicted.  q's page,
    inserted while R was still file_data, merges with s's page after the conflict."""
    P = PAGE_SIZE
    src = FakeSource()
    tasks = []
    for name, base, npages, content in (("p", 0x1000000, 100, "x"), ("q", 0x4000000, 200, "y"),
                                       ("s", 0x8000000, 100, "y")):
        tasks.append(src.add(name, [(Mapping(base, base + npages * P, "rw-p", F, "/lib/libF.so"),
                                     {0: fill(content)})]))
    ksm = Ksm(src)
    for t in reversed(tasks):  # frozen newcomers: no checksum gate, merges in the first scan;
        ksm.hint(t, True)  # the last frozen is scanned first (frozen_task_list): p, q, s
    ksm.full_scan()
    region = ksm.regions.get(ksm.regions.by_key[F])
    assert region.type == RegionType.CONFLICT and region.conflict == 2
    share = ksm.region_share()
    assert (share["conflicted"], share["file_data"], share["unknown"]) == (1, 0, 1)
    assert ksm.counters()["nr_regions"] == 1


def test_dll_look_back_finds_the_file_up_to_eight_mappings_back() -> None:
    P = PAGE_SIZE

    def anon(i: int, mergeable: bool = True) -> Mapping:
        return Mapping(i * P, (i + 1) * P, "rw-p", None, "", mergeable=mergeable)

    lib = Mapping(0, P, "r--p", G, "/lib/libG.so")
    # the standard layout: the previous mapping is a mergeable file mapping
    assert RegionTable.file_of([lib, anon(1)], 1) == (G, RegionType.FILE2)
    # DLL layout: unmergeable anonymous mappings in between
    maps = [lib] + [anon(i, mergeable=False) for i in range(1, 8)] + [anon(8)]
    assert RegionTable.file_of(maps, 8) == (G, RegionType.FILE2)
    # too far back (more than LKSM_REGION_ITER_MAX + 1 steps): no region
    maps = [lib] + [anon(i, mergeable=False) for i in range(1, 11)] + [anon(11)]
    assert RegionTable.file_of(maps, 11) == (None, RegionType.UNKNOWN)
    # a second, different file before a mergeable one stops the walk
    shared_f = Mapping(P, 2 * P, "rw-s", F, "/lib/libF.so", mergeable=False)
    maps = [lib, shared_f, anon(2, mergeable=False), anon(3)]
    # walk: anon(2) (no file), shared F (file := F, not mergeable), lib (G != F): stop
    assert RegionTable.file_of(maps, 3) == (None, RegionType.UNKNOWN)


def test_no_filter_has_no_region_files() -> None:
    from lksmfs.sysfs.attrs import AttributeTable

    names = AttributeTable(Ksm(FakeSource(), filter_enabled=False)).names()
    assert "nr_regions" not in names and "region_share" not in names
    assert "region_share" in AttributeTable(Ksm(FakeSource())).names()
