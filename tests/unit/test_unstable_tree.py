"""The unstable tree's naming of waiting items: one int32 per entry, by visit."""

from __future__ import annotations

import numpy as np

from lksmfs.engine.slot import MmSlot
from lksmfs.engine.unstable import UnstableTree
from lksmfs.sources.base import TaskId


def slot(sid: int) -> MmSlot:
    return MmSlot(sid, TaskId(100 + sid, 1), f"p{sid}", frozen=False)


def test_an_entry_names_its_slot_and_list_index_until_the_slot_is_visited_again() -> None:
    a, b = slot(1), slot(2)
    t = UnstableTree(10)
    at_a = t.visit(a, 5)  # numbers 0..4
    at_b = t.visit(b, 3)  # numbers 5..7
    assert (at_a, at_b) == (0, 5)
    t.put_many(np.array([11, 12], dtype=np.uint64), np.array([at_a + 4, at_b + 2]))
    assert t.where(t.get(11)) == (a, 4) and t.where(t.get(12)) == (b, 2)
    v, i = t.where_many(np.array([4, 5, 7]))
    assert v.tolist() == [0, 1, 1] and i.tolist() == [4, 0, 2]
    assert t.visit_slot(0) is a and t.visit_slot(1) is b
    # a's items go through the tree again: what the first visit left is stale
    assert t.visit(a, 2) == 8
    assert t.where(4) is None and t.visit_slot(0) is None and t.visit_slot(2) is a
    assert t.where(9) == (a, 1) and t.where(6) == (b, 1)


def test_an_empty_visit_still_takes_a_number() -> None:
    a, b = slot(1), slot(2)
    t = UnstableTree()
    assert t.visit(a, 0) == 0 and t.visit(b, 1) == 1
    assert t.where(1) == (b, 0)


def test_values_widen_past_int32() -> None:
    t = UnstableTree()
    assert t.index.vals.dtype == np.int32 and t.nbytes == t.index.capacity * 12
    t.visit(slot(1), 2**31 - 10)
    start = t.visit(slot(2), 100)
    assert t.index.vals.dtype == np.int64
    t.put(5, start + 99)
    assert t.get(5) == 2**31 + 89 and t.where(t.get(5))[1] == 99  # type: ignore[index]
