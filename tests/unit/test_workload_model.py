"""The content model: page bytes from keys, class counts, volatility and rewrites by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from lksmfs.workload.model import (
    PAGE_TABLE,
    SHARED,
    UNIQUE,
    ZERO,
    InstanceModel,
    page_bytes,
    round_half_up,
)
from lksmfs.workload.schema import load_workload

SMALL = Path(__file__).resolve().parents[2] / "config" / "workloads" / "small.yaml"


@pytest.fixture(scope="module")
def small():  # type: ignore[no-untyped-def]
    return load_workload(str(SMALL))


def test_page_bytes_is_key_xor_table_per_word() -> None:
    key = 0x0123_4567_89AB_CDEF
    page = page_bytes(key)
    assert len(page) == 4096
    for i in (0, 1, 255, 511):
        word = int.from_bytes(page[8 * i : 8 * i + 8], "little")
        assert word == key ^ PAGE_TABLE[i]
    assert page_bytes(0) == bytes(4096)
    assert page_bytes(key) != page_bytes(key + 1)


@pytest.mark.parametrize(
    "fraction,n,expected",
    [(0.5, 2, 1), (0.25, 2, 1), (0.25, 4, 1), (0.33, 3, 1), (1.0, 7, 7), (0.1, 4, 0),
     (0.0, 9, 0), (0.5, 5, 3)],
)
def test_round_half_up(fraction: float, n: int, expected: int) -> None:
    assert round_half_up(fraction, n) == expected


def test_class_counts_by_hand(small) -> None:  # type: ignore[no-untyped-def]
    viewer = InstanceModel(small, small.app("viewer"), 0)
    data = viewer.sections["lib:libfoo.so.1:data"]
    # 4 pages, share 0.5 -> 2 shared, zero 0.25 -> 1 zero, 1 unique
    assert (data.count(SHARED), data.count(ZERO), data.count(UNIQUE)) == (2, 1, 1)
    bss = viewer.sections["lib:libfoo.so.1:bss"]
    # 2 pages, share 0.5 -> 1, zero 0.25*2 = 0.5 rounds up -> 1, unique 0
    assert (bss.count(SHARED), bss.count(ZERO), bss.count(UNIQUE)) == (1, 1, 0)
    heap = viewer.sections["heap"]
    assert (heap.count(SHARED), heap.count(ZERO), heap.count(UNIQUE)) == (4, 2, 2)
    # a library's classes depend only on (library, offset): the same in every app
    player = InstanceModel(small, small.app("player"), 0)
    assert player.sections["lib:libfoo.so.1:data"].classes == data.classes
    assert [player.key(player.sections["lib:libfoo.so.1:data"], o) for o in range(4)
            if data.classes[o] != UNIQUE] == [viewer.key(data, o) for o in range(4)
                                               if data.classes[o] != UNIQUE]


def test_volatile_pages_by_hand(small) -> None:  # type: ignore[no-untyped-def]
    player = InstanceModel(small, small.app("player"), 0)
    # volatile 0.5 of the unique pages of each section:
    # libfoo data 1 unique -> 1, libfoo bss 0 -> 0, heap 2 -> 1, stack 2 -> 1, gpu 2 -> 1
    assert {sid: len(s.volatile) for sid, s in player.sections.items()} == {
        "lib:libfoo.so.1:data": 1, "lib:libfoo.so.1:bss": 0, "heap": 1, "stack": 1,
        "anon:gpu": 1,
    }
    before = {sid: player.keys(sid) for sid in player.sections}
    writes = player.writes
    assert writes == 16  # every page written once: 4 + 2 + 4 + 2 + 4
    changed = player.set_round(1)
    assert sum(len(v) for v in changed.values()) == 4
    assert player.writes == writes + 4
    for sid, sec in player.sections.items():
        after = player.keys(sid)
        differ = [o for o in range(sec.npages) if after[o] != before[sid][o]]
        assert differ == sec.volatile
    assert player.set_round(1) == {}  # same round: nothing rewritten


def test_rewrite_by_hand(small) -> None:  # type: ignore[no-untyped-def]
    a = InstanceModel(small, small.app("player"), 0)
    b = InstanceModel(small, small.app("player"), 0)
    before = {sid: a.keys(sid) for sid in a.sections}
    changed = a.rewrite(0.5, 1)
    # round_half_up(0.5 * n) per section: 4 -> 2, 2 -> 1, 4 -> 2, 2 -> 1, 4 -> 2
    assert {sid: len(offs) for sid, offs in changed.items()} == {
        "lib:libfoo.so.1:data": 2, "lib:libfoo.so.1:bss": 1, "heap": 2, "stack": 1,
        "anon:gpu": 2,
    }
    for sid, offs in changed.items():
        after = a.keys(sid)
        assert [o for o in range(len(after)) if after[o] != before[sid][o]] == offs
        assert all(after[o] != 0 for o in offs)  # rewritten pages are unique, never zero
    assert b.rewrite(0.5, 1) == changed  # deterministic: the child does the same
    with pytest.raises(ValueError):
        a.rewrite(0.5, 0)
