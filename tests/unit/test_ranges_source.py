"""RangeFilteredSource: only the given ranges of the given pids reach the engine."""

from __future__ import annotations

import numpy as np
from memfake import FakeSource, addr, fill

from lksmfs.sources.base import MemorySource
from lksmfs.sources.ranges import RangeFilteredSource


def test_only_the_ranges_of_listed_pids() -> None:
    fake = FakeSource()
    a = fake.anon("a", [fill(1), fill(2), fill(9), fill(9), fill(9), fill(3), fill(9), fill(9),
                        fill(9), fill(4)], base=addr(0x100), pid=1)
    b = fake.anon("b", [fill(1)], base=addr(0x100), pid=2)
    src = RangeFilteredSource(fake, {1: [(0x100, 0x102), (0x109, 0x10A)]})
    assert isinstance(src, MemorySource)
    assert src.tasks() == [a] and b in fake.tasks()
    got = src.present_anon(a, 0x100, 0x110)
    assert got.tolist() == [0x100, 0x101, 0x109]  # vpns 0x102..0x108 are outside
    assert bytes(src.read_pages(a, np.array([0x109], dtype=np.uint64))) == fill(4)
    assert src.present_anon(a, 0x102, 0x109).tolist() == []
