"""What a scan did, in the words `lksmfs scan` prints and the daemon logs.

One place for them, so that a user who reads both sees the same figures named the same
way: the scan record is `Ksm.last_scan` (what LKSM's lksm_scan_wrapup_wait() accounts),
the totals are the attributes of `Ksm.counters()`.
"""

from __future__ import annotations

from collections.abc import Mapping

from lksmfs.engine.params import mode_name
from lksmfs.system.proc import PAGE_SIZE

__all__ = ["describe_scan", "mib", "mode_name", "saved_pages"]


def saved_pages(counters: Mapping[str, int]) -> int:
    """Pages a kernel would have freed: every mapping sharing a KSM page, and every page
    merged with the zero page (use_zero_pages); mainline's general_profit less its cost."""
    return counters["pages_sharing"] + counters.get("ksm_zero_pages", 0)


def mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / 2**20:.1f} MiB"


def describe_scan(rec: Mapping[str, float | int], counters: Mapping[str, int]) -> str:
    """'full scan: 12 processes, 30120 pages scanned, 200 merged, 3 broken; pages_sharing
    1234 (4.8 MiB saved); 0.52 s' - a completed scan and the totals after it; a scan that
    gave tasks up after unexpected errors says how many ('..., 2 processes dropped after
    errors; ...')."""
    zero = counters.get("ksm_zero_pages", 0)
    failed = int(rec.get("tasks_failed", 0))
    return (f"{mode_name(rec['mode'])} scan: {rec['slots_scanned']} processes, {rec['pages_scanned']} pages "
            f"scanned, {rec['merged']} merged, {rec['broken']} broken"
            + (f", {failed} processes dropped after errors" if failed else "")
            + f"; pages_sharing {counters['pages_sharing']}"
            + (f", ksm_zero_pages {zero}" if zero else "")
            + f" ({mib(saved_pages(counters))} saved); {float(rec['wall_s']):.2f} s")
