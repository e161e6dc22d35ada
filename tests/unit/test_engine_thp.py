"""KSM's split of a transparent huge page before a merge, and what it does to the
zero-filled pages of that huge page (lksmfs.engine.thp), worked out by hand.

A merge attempt on a page of a THP splits the THP first (try_to_merge_one_page()); from
Linux 6.12 on the split maps the THP's zero-filled pages to the shared zero page: they
stop being anonymous pages.  The kernel's own KSM agrees with these rules on real huge
pages (the random-pattern comparison in the notes, and tests/live).
"""

from __future__ import annotations

import pytest
from memfake import FakeSource, fill

from lksmfs.engine.ksm import Ksm

KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def counts(ksm: Ksm) -> tuple[int, ...]:
    c = ksm.counters()
    return tuple(c[k] for k in KEYS)


def two_processes(thp: bool) -> tuple[FakeSource, Ksm]:
    """p1: one 2 MiB mapping, 'a' then 511 zero-filled pages; p2: one page of 'a'."""
    src = FakeSource()
    pages = [fill("a")] + [fill(0)] * 511
    if thp:
        src.anon_thp("p1", pages)
    else:
        src.anon("p1", pages)
    src.anon("p2", [fill("a")], base=0x20000000)
    return src, Ksm(src, filter_enabled=False)


def test_without_a_huge_page_the_zero_pages_merge() -> None:
    """The reference: 511 zero-filled pages make two KSM pages (256 + 255 mappings at
    max_page_sharing 256), and 'a' one with p2's page."""
    src, ksm = two_processes(thp=False)
    ksm.full_scan()  # checksums
    ksm.full_scan()
    assert counts(ksm)[:3] == (3, 255 + 254 + 1, 0)


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_a_merge_in_a_huge_page_gives_its_zero_pages_the_zero_page(use_zero_pages: int) -> None:
    """Round 2, p1 first: 'a' waits in the unstable tree; the first zero page waits too.
    The second zero page finds it - two pages of one THP: the THP cannot be split while
    both are held, so no merge; cmp_and_merge_page() splits it afterwards, and its 511
    zero pages become the zero page (the one waiting stays in the tree until its item
    goes; the second is volatile).  The rest of them are not visited: their items are
    freed as the scanner passes them.  p2's 'a' then merges with p1's 'a' (its
    THP split already).  With use_zero_pages, the first zero page's merge with the zero
    page splits the THP itself, fails ("not really empty") and the page waits in the
    unstable tree all the same.  Round 3: the zero pages are gone from p1."""
    src, ksm = two_processes(thp=True)
    ksm.tunables.use_zero_pages = use_zero_pages
    ksm.full_scan()
    assert counts(ksm) == (0, 0, 0, 513)
    ksm.full_scan()
    # volatile: the second zero page (no merge, no insert); with use_zero_pages the
    # split came at the first, so the second is not visited at all
    assert counts(ksm) == (1, 1, 1, 0 if use_zero_pages else 1)
    assert ksm.counters()["ksm_zero_pages"] == 0
    ksm.full_scan()
    assert counts(ksm) == (1, 1, 0, 0)
    assert ksm.counters()["rmap_items"] == 2


def test_a_huge_page_without_a_merge_keeps_its_zero_page() -> None:
    """A THP whose pages merge with nothing is never split: its one zero-filled page
    stays an anonymous page, waiting in the unstable tree like the others."""
    src = FakeSource()
    src.anon_thp("p1", [fill(0)] + [bytes([i % 251 + 1, i // 251 + 1]) * 2048 for i in range(511)])
    ksm = Ksm(src, filter_enabled=False)
    ksm.full_scan()
    ksm.full_scan()
    assert counts(ksm) == (0, 0, 512, 0)


def test_a_zero_page_written_again_comes_back() -> None:
    """A page the split gave the zero page is an anonymous page again once written."""
    src, ksm = two_processes(thp=True)
    for _ in range(3):
        ksm.full_scan()
    p1 = next(t for t in src.procs if src.procs[t].comm == "p1")
    src.set_page(p1, 0, 7, fill("z"))
    ksm.full_scan()  # its checksum
    assert ksm.counters()["rmap_items"] == 3
