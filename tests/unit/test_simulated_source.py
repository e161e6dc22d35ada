"""SimulatedSource: determinism, layout, contents, the timeline and the sharing oracle.

The expected sharing of small.yaml is worked out by hand in the docstrings below, from the
workload's numbers and the rules of lksmfs.workload.model.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lksmfs.sources.base import MemorySource, ProcessGone
from lksmfs.workload.model import page_bytes
from lksmfs.workload.schema import load_workload
from lksmfs.workload.simulated import SimulatedSource

CONFIG = Path(__file__).resolve().parents[2] / "config" / "workloads"
FOO, BAR = "libfoo.so.1", "libbar.so.2"


@pytest.fixture
def small() -> SimulatedSource:
    return SimulatedSource(load_workload(str(CONFIG / "small.yaml")))


def _all_pages(src: SimulatedSource) -> dict[str, list[bytes]]:
    out = {}
    for name in src.instances():
        task = src.task_of(name)
        pages: list[bytes] = []
        for m in src.mappings(task):
            vpns = src.present_anon(task, m.start_vpn, m.end_vpn)
            if len(vpns):
                buf = bytes(src.read_pages(task, vpns))
                pages += [buf[i * 4096:(i + 1) * 4096] for i in range(len(vpns))]
        out[name] = pages
    return out


def _brute_sharing(src: SimulatedSource) -> tuple[int, int]:
    """pages_shared/pages_sharing by counting equal page bytes read through the protocol."""
    counts = collections.Counter(p for pages in _all_pages(src).values() for p in pages)
    dup = [c for c in counts.values() if c >= 2]
    return len(dup), sum(c - 1 for c in dup)


def _mapping_at(src: SimulatedSource, name: str, vpn: int):  # type: ignore[no-untyped-def]
    return next(m for m in src.mappings(src.task_of(name)) if m.start_vpn == vpn)


def test_is_a_memory_source(small: SimulatedSource) -> None:
    assert isinstance(small, MemorySource)
    assert small.instances() == ["viewer/0", "viewer/1", "player/0", "widget/0"]
    assert len({t.pid for t in small.tasks()}) == 4


def test_deterministic_for_a_seed() -> None:
    w = load_workload(str(CONFIG / "small.yaml"))
    a, b = SimulatedSource(w), SimulatedSource(w)
    assert a.tasks() == b.tasks()
    for name in a.instances():
        assert a.mappings(a.task_of(name)) == b.mappings(b.task_of(name))
    assert _all_pages(a) == _all_pages(b)
    c = SimulatedSource(dataclasses.replace(w, seed=8))
    assert c.mappings(c.task_of("viewer/0")) != a.mappings(a.task_of("viewer/0"))
    assert _all_pages(c)["viewer/0"] != _all_pages(a)["viewer/0"]


def test_layout_like_a_real_process(small: SimulatedSource) -> None:
    for name in small.instances():
        maps = small.mappings(small.task_of(name))
        assert all(x.end <= y.start for x, y in zip(maps, maps[1:], strict=False))
        assert sum(m.is_heap for m in maps) == 1 and sum(m.is_stack for m in maps) == 1
    maps = small.mappings(small.task_of("viewer/0"))
    data_vpn = small.section_vpn("viewer/0", f"lib:{FOO}:data")
    i = next(k for k, m in enumerate(maps) if m.start_vpn == data_vpn)
    text, rodata, data, bss = maps[i - 2], maps[i - 1], maps[i], maps[i + 1]
    ident = small.lib_identity(FOO)
    assert (text.perms, text.file, text.is_exec, text.npages) == ("r-xp", ident, True, 2)
    assert (rodata.perms, rodata.file, rodata.has_anon) == ("r--p", ident, False)
    assert (data.perms, data.file, data.has_anon, data.npages) == ("rw-p", ident, True, 4)
    assert (bss.perms, bss.file, bss.start, bss.npages) == ("rw-p", None, data.end, 2)
    # only workload pages are anonymous: none in text/rodata, all in data/bss
    task = small.task_of("viewer/0")
    assert len(small.present_anon(task, text.start_vpn, rodata.end_vpn)) == 0
    assert list(small.present_anon(task, data.start_vpn, bss.end_vpn)) == list(
        range(data.start_vpn, bss.end_vpn))
    # viewer: libfoo 4+2, libbar 2+1, heap 8, stack 2 = 19 anonymous pages
    assert small.stat(task).anon_pages == 19


def test_aslr_bases_differ_per_instance(small: SimulatedSource) -> None:
    starts = {n: small.section_vpn(n, f"lib:{FOO}:data")
              for n in ("viewer/0", "viewer/1", "player/0")}
    assert len(set(starts.values())) == 3
    heaps = {small.section_vpn(n, "heap") for n in small.instances()}
    assert len(heaps) == 4


def test_equal_content_at_equal_offsets(small: SimulatedSource) -> None:
    """libfoo .data (4 pages, share 0.5, zero 0.25): at 2 offsets all three mappers hold the
    same non-zero page, at 1 offset all hold zeros, at 1 offset all differ."""
    pages = {}
    for n in ("viewer/0", "viewer/1", "player/0"):
        vpn = small.section_vpn(n, f"lib:{FOO}:data")
        buf = bytes(small.read_pages(small.task_of(n), np.arange(vpn, vpn + 4, dtype=np.uint64)))
        pages[n] = [buf[i * 4096:(i + 1) * 4096] for i in range(4)]
    same = [o for o in range(4) if len({pages[n][o] for n in pages}) == 1]
    zero = [o for o in same if pages["viewer/0"][o] == bytes(4096)]
    differ = [o for o in range(4) if len({pages[n][o] for n in pages}) == 3]
    assert len(same) == 3 and len(zero) == 1 and len(differ) == 1


def test_read_pages_matches_the_pure_python_content(small: SimulatedSource) -> None:
    inst = small.instance("player/0")
    buf = bytes(small.read_pages(inst.task, inst.vpns))
    for i, key in enumerate(inst.keys):
        assert buf[i * 4096:(i + 1) * 4096] == page_bytes(int(key))
    with pytest.raises(ValueError):
        small.read_pages(inst.task, np.array([1], dtype=np.uint64))


def test_expected_sharing_by_hand(small: SimulatedSource) -> None:
    """small.yaml, all 4 instances, use_zero_pages=0:

    file_data: libfoo 2 shared offsets x 3 mappers (viewer x2, player) -> 2 shared, 4 sharing;
               libbar 2 x 3 (viewer x2, widget) -> 2, 4.  Total 4, 8.
    file_bss:  libfoo 1 x 3 -> 1, 2; libbar 1 x 3 -> 1, 2.  Total 2, 4.
    heap:      pool pages 0,1 in viewer x2 + player (3 copies), 2,3 in viewer x2 -> 4, 2+2+1+1=6.
    stack, anon: nothing shared (gpu pool is in one instance only) -> 0, 0.
    zero:      libfoo data 1 x3 + libfoo bss 1 x3 + viewer heap 2 x2 = 10 pages -> 1, 9.
    Total 11 shared, 27 sharing.
    """
    e = small.expected_sharing()
    got = {k: (s.pages_shared, s.pages_sharing) for k, s in e.by_kind.items()}
    assert got == {"file_data": (4, 8), "file_bss": (2, 4), "heap": (4, 6), "stack": (0, 0),
                   "anon": (0, 0)}
    assert (e.zero.pages_shared, e.zero.pages_sharing, e.zero_pages) == (1, 9, 10)
    assert (e.pages_shared, e.pages_sharing, e.ksm_zero_pages) == (11, 27, 0)
    assert e.pages_total == 19 + 19 + 16 + 6
    assert _brute_sharing(small) == (11, 27)
    z = small.expected_sharing(use_zero_pages=True)
    assert (z.pages_shared, z.pages_sharing, z.ksm_zero_pages) == (10, 18, 10)


def test_expected_sharing_skips_short_tasks(small: SimulatedSource) -> None:
    """Without widget (50 ms): libbar is mapped twice -> data 2, 2 and bss 1, 1;
    file_data 4, 6; file_bss 2, 3; heap unchanged 4, 6; zero 10 pages -> 1, 9: 11, 24."""
    e = small.expected_sharing(skip_short=True)
    assert (e.by_kind["file_data"].pages_sharing, e.by_kind["file_bss"].pages_sharing) == (6, 3)
    assert (e.pages_shared, e.pages_sharing) == (11, 24)


def test_timeline_effects(small: SimulatedSource) -> None:
    v0, v1, p0 = (small.task_of(n) for n in ("viewer/0", "viewer/1", "player/0"))
    faults = small.stat(p0).faults
    eff = small.advance_round(1)
    assert eff.hints == [(v0, True), (v1, True)] and eff.one_shot == []
    # player runs: its 4 volatile pages were rewritten for round 1
    assert small.stat(p0).faults == faults + 4
    assert small.advance_round(2).one_shot == [1]
    assert small.advance_round(4).hints == [(v1, False)]
    eff = small.advance_round(6)
    assert len(eff.spawned) == 1 and small.instance_of(eff.spawned[0]) == "viewer/2"
    assert eff.exited == [p0] and eff.one_shot == [2]
    assert p0 not in small.tasks() and eff.spawned[0] in small.tasks()
    with pytest.raises(ProcessGone):
        small.stat(p0)
    with pytest.raises(ValueError):
        small.advance_round(5)


def test_frozen_instance_keeps_its_memory_until_thawed(small: SimulatedSource) -> None:
    p0 = small.task_of("player/0")
    small.freeze("player")
    before = _all_pages(small)["player/0"]
    faults = small.stat(p0).faults
    small.advance_round(3)  # volatile rewrites and the round-3 rewrite event: deferred
    assert _all_pages(small)["player/0"] == before and small.stat(p0).faults == faults
    assert small.expected_sharing().pages_sharing == 27
    small.thaw("player")
    # caught up: 4 volatile pages + rewrite 0.5 of 4,2,4,2,4 pages = 2+1+2+1+2 = 8
    assert small.stat(p0).faults == faults + 4 + 8


def test_rewrite_breaks_sharing_by_hand(small: SimulatedSource) -> None:
    """Rewriting all of player's pages removes it from every group:
    file_data: libfoo 2 x2 -> 2, 2; libbar 2 x3 -> 2, 4: 4, 6.  file_bss: libfoo 1 x2 -> 1, 1;
    libbar 1 x3 -> 1, 2: 2, 3.  heap: pool 0..3 in viewer x2 -> 4, 4.
    zero: libfoo data 1 x2 + bss 1 x2 + viewer heap 2 x2 = 8 -> 1, 7.  Total 11, 20."""
    p0 = small.task_of("player/0")
    faults = small.stat(p0).faults
    small.rewrite("player/0", 1.0)
    e = small.expected_sharing()
    assert (e.by_kind["file_data"].pages_sharing, e.by_kind["file_bss"].pages_sharing,
            e.by_kind["heap"].pages_sharing, e.zero.pages_sharing) == (6, 3, 4, 7)
    assert (e.pages_shared, e.pages_sharing) == (11, 20)
    assert _brute_sharing(small) == (11, 20)
    assert small.stat(p0).faults == faults + 16


def test_tizen_is_big() -> None:
    src = SimulatedSource.from_file(str(CONFIG / "tizen-tv.yaml"))
    assert 30 <= len(src.tasks()) <= 40
    scanned = 0
    for task in src.tasks():
        for m in src.mappings(task):
            vpns = src.present_anon(task, m.start_vpn, m.end_vpn)
            for i in range(0, len(vpns), 100):
                scanned += len(src.read_pages(task, vpns[i:i + 100])) // 4096
    e = src.expected_sharing()
    assert scanned == e.pages_total > 20000
    assert all(e.by_kind[k].pages_sharing > 0 for k in ("file_data", "file_bss", "heap", "anon"))
    for r in range(1, 11):
        src.advance_round(r)
