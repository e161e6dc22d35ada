"""Pure parts of the test kit's page patterns: the hand-derivation rules and the child's spec
language (testkit/patterns.py, testkit/memchild.py)."""

from __future__ import annotations

import ctypes
import os

import pytest

from lksmfs.system.proc import PAGE_SIZE
from testkit import memchild
from testkit.patterns import (
    byte_runs,
    expected_counts,
    group_counts,
    pattern_page,
    spec_groups,
)
from testkit.patterns import format_pages as format_spec


@pytest.mark.parametrize(
    ("n", "mps", "want"),
    [
        (0, 256, (0, 0)),
        (1, 256, (0, 0)),  # a lone page has nothing to merge with
        (2, 256, (1, 1)),
        (192, 256, (1, 191)),  # LTP: 3 x 64 pages of 'a'
        (256, 256, (1, 255)),  # exactly one full KSM page
        (257, 256, (1, 255)),  # one left over, alone: unshared
        (258, 256, (2, 256)),  # two left over: a second KSM page
        (192, 2, (96, 96)),  # pairs
        (191, 2, (95, 95)),
        (64, 3, (21, 42)),  # 21 full triples, one page left
        (128, 3, (43, 85)),  # 42 triples + one pair
    ],
)
def test_group_counts(n: int, mps: int, want: tuple[int, int]) -> None:
    assert group_counts(n, mps) == want


def test_group_counts_rejects_mps_below_2() -> None:
    with pytest.raises(ValueError):
        group_counts(10, 1)


def test_expected_counts_sums_groups() -> None:
    # c: 64 pages, a: 128 pages (LTP phase 1) -> (1,63) + (1,127)
    assert expected_counts([64, 128, 1, 1], 1000) == (2, 190)


def test_spec_groups_keys() -> None:
    specs = [
        [(2, "a"), (1, "zero"), (1, "same")],
        [(2, 97), (1, 0), (1, "unique")],
        [(3, "unique"), (1, "same")],
    ]
    # 'a' and 97 are the same byte; 'zero' is byte 0; 'same' keyed by mapping index
    assert spec_groups(specs) == {97: 4, 0: 2, ("same", 3): 2}


def test_format_spec_roundtrips_through_child_parser() -> None:
    spec = [(64, "a"), (8, "zero"), (4, "unique"), (2, "same"), (1, 255)]
    text = format_spec(spec)
    assert text == "64:97,8:zero,4:unique,2:same,1:255"
    assert memchild.parse_pages(text) == [
        (64, 97), (8, "zero"), (4, "unique"), (2, "same"), (1, 255),
    ]


@pytest.mark.parametrize("bad", ["1:256", "-1:a", "3:nope"])
def test_child_parser_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        memchild.parse_pages(bad)


def test_format_spec_rejects_bad_bytes() -> None:
    with pytest.raises(ValueError):
        format_spec([(1, 300)])
    with pytest.raises(ValueError):
        format_spec([])


def test_child_writes_what_pattern_page_predicts() -> None:
    """The child's page writer (run on a local buffer) produces `pattern_page`'s contents, and
    unique pages differ from each other and from every 'same' page."""
    npages = 6
    buf = (ctypes.c_char * (npages * PAGE_SIZE))()
    addr = ctypes.addressof(buf)
    memchild.write_pages(addr, [(2, 7), (2, "same"), (2, "unique")], phase=1)
    data = bytes(buf)
    pages = [data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(npages)]
    assert pages[0] == pages[1] == pattern_page(7)
    assert pages[2] == pattern_page(("same", 2))
    assert pages[3] == pattern_page(("same", 3))
    assert pages[2] != pages[3]
    assert pages[4] != pages[5]
    assert int.from_bytes(pages[4][8:16], "little") == os.getpid()
    assert pattern_page(0) == bytes(PAGE_SIZE)


def test_other_patterns_are_in_no_group() -> None:
    """'read' pages map the shared zero page and 'untouched' ones are not present: neither
    is an anonymous page KSM could merge; 'zero' pages are written zeros (byte 0)."""
    specs = [[(3, "read"), (2, "untouched"), (1, "zero")], [(4, "read"), (1, 0)]]
    assert spec_groups(specs) == {0: 2}
    assert byte_runs([7, 7, 1, 7]) == [(2, 7), (1, 1), (1, 7)]
    assert format_spec([(3, "read"), (2, "untouched")]) == "3:read,2:untouched"


def test_child_leaves_read_and_untouched_pages_as_they_were() -> None:
    npages = 4
    buf = (ctypes.c_char * (npages * PAGE_SIZE)).from_buffer(bytearray(b"\x55" * npages * PAGE_SIZE))
    memchild.write_pages(ctypes.addressof(buf), [(1, "zero"), (1, "read"), (1, "untouched"), (1, 9)],
                         phase=0)
    data = bytes(buf)
    assert data[:PAGE_SIZE] == bytes(PAGE_SIZE)
    assert data[PAGE_SIZE:3 * PAGE_SIZE] == b"\x55" * (2 * PAGE_SIZE)  # read, never written
    assert data[3 * PAGE_SIZE:] == b"\x09" * PAGE_SIZE
