"""The numpy hash table behind the stable and unstable trees, against a dict model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lksmfs.engine.hashindex import HashIndex, normkey

keys = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(keys, max_size=300), max_size=6),
    singles=st.lists(st.tuples(keys, st.integers(0, 2**40)), max_size=60),
    drop=st.lists(keys, max_size=40),
)
def test_matches_a_dict(batches: list[list[int]], singles: list[tuple[int, int]], drop: list[int]) -> None:
    h = HashIndex(4)
    model: dict[int, int] = {}
    for batch in batches:  # put_many: absent, distinct keys (as the engine uses it)
        ks = np.unique(normkey(np.array(batch, dtype=np.uint64)))
        ks = np.array([k for k in ks.tolist() if k not in model], dtype=np.uint64)
        vals = np.arange(len(model), len(model) + ks.shape[0], dtype=np.int64)
        h.put_many(ks, vals)
        model.update(zip(ks.tolist(), vals.tolist(), strict=True))
    for k, v in singles:  # put: insert or overwrite
        h.put(k, v)
        model[int(normkey(np.array([k], dtype=np.uint64))[0])] = v
    for k in drop + list(model)[::3]:
        nk = int(normkey(np.array([k], dtype=np.uint64))[0])
        assert h.delete(k) == (nk in model)
        model.pop(nk, None)
    assert len(h) == len(model)
    for k, v in model.items():
        assert h.get(k) == v
    probe = np.array(list(model) + [5, 2**63 + 7], dtype=np.uint64)
    want = [model.get(int(k), -1) for k in probe]
    assert h.get_many(normkey(probe)).tolist() == want


def test_clear_empties_and_shrinks() -> None:
    h = HashIndex(4)
    h.put_many(np.arange(10, 100_010, dtype=np.uint64), np.arange(100_000, dtype=np.int64))
    assert h.get(10_000) == 9_990
    h.clear()
    assert len(h) == 0 and h.get(10_000) == -1 and h.nbytes <= 2048 * 16


def test_a_table_sized_for_its_entries_holds_them_without_growing() -> None:
    """The capacity is not rounded up to a power of two: 100,000 entries at 75% load
    take 133,334 slots (a power of two would be 262,144), and filling them all moves
    nothing; one entry more grows the table by half the room the entries need."""
    h = HashIndex(100_000)
    assert h.capacity == 133_334
    h.put_many(np.arange(2, 100_002, dtype=np.uint64), np.arange(100_000, dtype=np.int64))
    assert h.capacity == 133_334 and len(h) == 100_000
    h.put(5_000_000, 7)
    assert h.capacity == 200_002 and len(h) == 100_001
    assert h.get(5_000_000) == 7 and h.get(99_999) == 99_997 and h.get(100_002) == -1


def test_int32_values_take_twelve_bytes_a_slot() -> None:
    h = HashIndex(3000, vals=np.int32)
    assert h.nbytes == h.capacity * 12
    h.put_many(np.array([10, 11], dtype=np.uint64), np.array([-5, 2**31 - 1], dtype=np.int64))
    assert h.get_many(np.array([10, 11, 12], dtype=np.uint64)).tolist() == [-5, 2**31 - 1, -1]
