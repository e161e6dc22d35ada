"""Per-process figures under `--policy ksm` against the kernel's /proc/PID/ksm_stat.

The same stopped processes are merged by the kernel's ksmd, then (the kernel's merges
undone) by a mounted lksmfs: each process's ksm_stat - ksm_rmap_items, ksm_zero_pages,
ksm_merging_pages, ksm_process_profit, ksm_merge_any, ksm_mergeable - and general_profit
must be what the hand derivation says, in both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lksmfs.system.proc import PAGE_SIZE, parse_ksm_stat
from lksmfs.system.waiting import wait_until
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PatternGroup
from testkit.mount import Mounts, read_attr, sh

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

RMAP_ITEM = 64  # sizeof(struct ksm_rmap_item) on x86_64
# three madvised mappings of 64 pages: 'a' in the first two, 16 zero-filled pages, 16
# 'same' pages equal pairwise across the first two, 'b' in the last two, 16 unique
SPECS = (((32, "a"), (16, "zero"), (16, "same")), ((32, "a"), (16, "b"), (16, "same")), ((48, "b"), (16, "unique")))
# by hand (max_page_sharing 256, use_zero_pages 0): every present page of a VM_MERGEABLE
# mapping has an rmap_item (64 each); a page is merging when it maps a KSM page:
#   p0: 32 a + 16 zero (one KSM page among themselves) + 16 same = 64
#   p1: 32 a + 16 b + 16 same = 64;  p2: 48 b (the 16 unique never merge) = 48
# ksm_process_profit = merging * 4096 - 64 * 64;  merge_any no (madvise), mergeable yes
MERGING = (64, 64, 48)
# general_profit = (pages_sharing + ksm_zero_pages) * 4096 - rmap_items * 64: KSM pages
# a (64 maps), zero (16), b (64) and 16 of same (2 maps each): 19 shared, sharing
# 63 + 15 + 63 + 16 = 157 (= 192 items - 16 unique - 19 shared); 192 rmap_items
SHARING = 157


def by_hand() -> tuple[list[dict[str, str]], int]:
    rows = [{"ksm_rmap_items": "64", "ksm_zero_pages": "0", "ksm_merging_pages": str(m),
             "ksm_process_profit": str(m * PAGE_SIZE - 64 * RMAP_ITEM), "ksm_merge_any": "no",
             "ksm_mergeable": "yes"} for m in MERGING]
    return rows, SHARING * PAGE_SIZE - 3 * 64 * RMAP_ITEM


@pytest.fixture
def kernel_ksm() -> Iterator[KernelKsm]:
    with KernelKsm() as k:
        yield k


def test_per_process_ksm_stat_equals_the_kernels(mounts: Mounts, kernel_ksm: KernelKsm) -> None:
    """Every field of every child's ksm_stat, and general_profit, after convergence.

    The kernel's general_profit is global: another user's mergeable process (not ours,
    seen in /proc/*/ksm_stat) would add to it, so it is compared only when none is."""
    hand, hand_profit = by_hand()
    assert hand_profit == 157 * 4096 - 12288 == 630784
    kernel_ksm.configure(max_page_sharing=256, smart_scan=0, sleep_millisecs=20)
    with PatternGroup(SPECS, scope="madvise") as group:
        kernel_ksm.converge(timeout_s=60)
        c = kernel_ksm.stopped_counters()
        kernel = [parse_ksm_stat(Path(f"/proc/{pid}/ksm_stat").read_bytes()) for pid in group.pids]
        alone = not kernel_ksm.foreign_mergeable(group.pids)
        kernel_ksm.unmerge()
        args = [a for p in group.pids for a in ("--pid", str(p))]
        d = mounts.start("--policy", "ksm", *args, "--set", "max_page_sharing=256", "--set", "smart_scan=0",
                         "--set", "sleep_millisecs=0", "--set", "pages_to_scan=10000", "--set", "run=1")
        mp = d.mountpoint
        wait_until(lambda: int(read_attr(mp, "full_scans")) >= 4 and int(read_attr(mp, "pages_sharing")) == SHARING,
                   60, what="lksmfs converged")
        assert sh("echo 0 > run", cwd=mp).returncode == 0
        ours = [parse_ksm_stat(sh(f"cat proc/{pid}/ksm_stat", cwd=mp).stdout.encode()) for pid in group.pids]
        profit = int(read_attr(mp, "general_profit"))
        assert sh(f"cat proc/{group.pids[0]}/ksm_process_profit", cwd=mp).stdout == hand[0]["ksm_process_profit"] + "\n"
    assert kernel == hand, f"kernel {kernel} != hand {hand}"
    assert ours == hand, f"lksmfs {ours} != hand {hand}"
    assert profit == hand_profit
    if alone:
        assert c["general_profit"] == hand_profit
