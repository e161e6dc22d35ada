"""LKSM_FILTER's effect on tizen-tv.yaml, against bounds counted from the workload model.

The bounds come from lksmfs.workload.model (page classes per section), not from the
engine: after maturity a slot that is neither newcomer nor frozen scans, per section,
- heap and stack: every page (heap is never filtered, stacks have no region);
- a library .data/.bss: only offsets where a merge happened - shared-class offsets of a
  library mapped by >= 2 scanned tasks, and zero-class offsets (zero pages merge with
  each other anywhere) - or the whole section when there is no such offset (the seed's
  lksm_region_skipped(): a region without a bit set is not filtered);
- anonymous pools (filed by the DLL look-back under the app binary, one region per app):
  the union of the pools' mergeable offsets, or everything when the app's pools differ in
  filter length (the region is resized, then conflicted) or nothing merged.
Round 4 of the timeline is the first full scan with every region mature (scan 7; regions
are born at scan 0's join, mature when the scan round exceeds birth + 5), all frozen tasks
have had their one unfiltered scan, and no rewrite has happened yet.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import pytest

from lksmfs.commands.simulate import simulate
from lksmfs.engine.params import KSM_SHORT_TASK_TIME_MS
from lksmfs.workload.model import SHARED, ZERO, InstanceModel
from lksmfs.workload.schema import load_workload

TIZEN = str(Path(__file__).resolve().parents[2] / "config" / "workloads" / "tizen-tv.yaml")
ROUND = 4
MAX_PAGE_SHARING = 256  # the default: a content shared by n pages needs ceil(n/256) KSM pages


def filter_words(npages: int) -> int:
    """Filter length in 64-bit words, the unit in which the seed compares region sizes."""
    return max(1, math.ceil(npages / 64))


def scanned_instances() -> list[InstanceModel]:
    w = load_workload(TIZEN)
    assert all(e.action not in ("spawn", "exit", "rewrite") for e in w.timeline if e.round <= ROUND)
    return [InstanceModel(w, app, k) for app in w.apps for k in range(app.count)
            if app.cpu_ms >= KSM_SHORT_TASK_TIME_MS]


@functools.cache
def derived_bounds() -> tuple[int, int, int]:
    """(pages in all scanned tasks, pages a mature full scan reads, pages_sharing)."""
    insts = scanned_instances()
    lib_users = Counter(sid for i in insts for sid, s in i.sections.items() if s.library)
    key_count = Counter(k for i in insts for s in i.sections.values() for k in s.shared_keys if k)
    zeros = sum(s.count(ZERO) for i in insts for s in i.sections.values())
    total = scanned = 0
    for inst in insts:
        pools = [s for s in inst.sections.values() if s.kind == "anon"]
        pool_bits = {off for s in pools for off, c in enumerate(s.classes)
                     if c == ZERO or (c == SHARED and key_count[s.shared_keys[off]] >= 2)}
        conflicted = len({filter_words(s.npages) for s in pools if s.npages > 64}) > 1
        for sid, sec in inst.sections.items():
            total += sec.npages
            if sec.kind in ("heap", "stack"):
                scanned += sec.npages
            elif sec.kind == "anon":
                kept = sum(1 for off in range(sec.npages) if off in pool_bits)
                scanned += sec.npages if conflicted or not pool_bits else kept
            else:
                merged = sum(1 for c in sec.classes
                             if c == ZERO or (c == SHARED and lib_users[sid] >= 2))
                scanned += merged or sec.npages
    sharing = sum(n - math.ceil(n / MAX_PAGE_SHARING) for n in key_count.values() if n >= 2)
    sharing += zeros - math.ceil(zeros / MAX_PAGE_SHARING)
    return total, scanned, sharing


@pytest.fixture(scope="module")
def round_scan() -> dict:
    records = simulate(TIZEN, rounds=ROUND, filter_enabled=True).scans
    last = records[-1]
    assert (last["round"], last["mode"]) == (ROUND, "full")
    assert len(records) >= 6  # its scan round is past maturity
    return last


def test_filter_skips_the_never_merged_library_offsets(round_scan: dict) -> None:
    total, bound, _ = derived_bounds()
    assert bound <= 0.7 * total  # the workload is one where the filter pays (issue 5)
    assert round_scan["scanned"] <= bound


def test_filter_keeps_the_sharing(round_scan: dict) -> None:
    _, _, sharing = derived_bounds()
    assert round_scan["pages_sharing"] >= sharing
