"""The KSM advisor of mainline Linux (mm/ksm.c, 6.7+): `advisor_mode` scan-time.

With the scan-time advisor on, ksmd retunes its own pages_to_scan after every full scan
(advisor_stop_scan() -> scan_time_advisor(), called where scan_get_next_rmap_item()
wraps back to ksm_mm_head), aiming at a whole scan taking `advisor_target_scan_time`
seconds:

- scan_time: whole seconds from advisor_start_scan() (the cursor leaving the list head)
  to the wrap, at least 1;
- cpu_percent: the CPU ksmd used since the last advisor run, in percent of scan_time
  (at least 1);
- factor = target * 100 / scan_time; change = EWMA (weight 30%) of scan_time in percent
  of the previous scan's time;
- pages = pages_to_scan * 100 / factor * change / 100, then bounded by the CPU the next
  scan may take: at most (pages_to_scan / cpu_percent) * advisor_max_cpu, at least that
  per-percent cost times KSM_ADVISOR_MIN_CPU (10), and at most
  advisor_max_pages_to_scan.  advisor_min_pages_to_scan is no bound: it is only where
  pages_to_scan starts when the advisor is switched on (set_advisor_defaults()).

Switching advisor_mode zeroes the advisor's context (set_advisor_defaults()): the EWMA
starts from 0, the first CPU figure is everything the scanner used since it started,
and a scan already under way when it was switched on measures its time from 0 of the
clock (ktime_get() counts from boot; the daemon's time.monotonic() is the same clock).

Everything is C's unsigned arithmetic, wraps and truncations included: pages_to_scan
and advisor_max_cpu are `unsigned int`, the rest `unsigned long`.  Pure: the clock and
the scanner's CPU time are arguments (the daemon gives the scanner thread's CPU time,
a simulation a modelled one).
"""

from __future__ import annotations

from dataclasses import dataclass

from lksmfs.engine.params import UINT_MAX, ULONG_MAX, Tunables

# enum ksm_advisor_type, and advisor_mode's words for it
KSM_ADVISOR_NONE = 0
KSM_ADVISOR_SCAN_TIME = 1
ADVISOR_MODES = ("none", "scan-time")
DEFAULT_PAGES_TO_SCAN = 100  # mm/ksm.c DEFAULT_PAGES_TO_SCAN: advisor_mode back to none
KSM_ADVISOR_MIN_CPU = 10
EWMA_WEIGHT = 30
NSEC_PER_MSEC = 1_000_000
# the CPU a simulated scanner is taken to use per page scanned (simulate, compare): about
# what ksmd spends on a 4 KiB page it checksums and looks up, so the advisor's CPU cap
# acts on simulated memory much as on a kernel's
MODELLED_SCAN_NS_PER_PAGE = 2_000


@dataclass
class AdvisorCtx:
    """struct advisor_ctx: start_scan on the engine's clock (seconds), the previous
    scan's time (whole seconds), the smoothed change (percent), and the scanner's CPU
    time at the last advisor run (ns)."""

    start_scan: float = 0.0
    scan_time: int = 0
    change: int = 0
    cpu_time: int = 0


@dataclass(frozen=True)
class AdvisorStep:
    """What trace_ksm_advisor() reports of one run."""

    scan_time: int
    pages_to_scan: int
    cpu_percent: int


def ewma(prev: int, curr: int) -> int:
    """ewma(): exponentially weighted moving average, weight EWMA_WEIGHT percent."""
    return (((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) & ULONG_MAX) // 100


def mode_show(mode: int) -> str:
    """advisor_mode_show(): the modes, the current one in brackets."""
    return " ".join(f"[{name}]" if i == mode else name for i, name in enumerate(ADVISOR_MODES))


def set_advisor_defaults(ctx: AdvisorCtx, t: Tunables) -> None:
    """set_advisor_defaults(), after advisor_mode changed: none puts pages_to_scan back to
    the default; scan-time zeroes the context and starts from advisor_min_pages_to_scan
    (an unsigned long stored into the unsigned int)."""
    if t.advisor_mode == KSM_ADVISOR_NONE:
        t.pages_to_scan = DEFAULT_PAGES_TO_SCAN
    else:
        ctx.start_scan, ctx.scan_time, ctx.change, ctx.cpu_time = 0.0, 0, 0, 0
        t.pages_to_scan = t.advisor_min_pages_to_scan & UINT_MAX


def advisor_start_scan(ctx: AdvisorCtx, t: Tunables, now: float) -> None:
    """advisor_start_scan(): the cursor leaves ksm_mm_head."""
    if t.advisor_mode == KSM_ADVISOR_SCAN_TIME:
        ctx.start_scan = now


def advisor_stop_scan(ctx: AdvisorCtx, t: Tunables, now: float, cpu_time_ns: int) -> AdvisorStep | None:
    """advisor_stop_scan(): the cursor wrapped; retune pages_to_scan if the advisor is on."""
    if t.advisor_mode != KSM_ADVISOR_SCAN_TIME:
        return None
    return scan_time_advisor(ctx, t, now, cpu_time_ns)


def scan_time_advisor(ctx: AdvisorCtx, t: Tunables, now: float, cpu_time_ns: int) -> AdvisorStep:
    """scan_time_advisor(): the new pages_to_scan from the scan that just ended (`now` on
    the engine's clock, `cpu_time_ns` the scanner's total CPU time: task_sched_runtime)."""
    # ktime_ms_delta() then div_s64(.., MSEC_PER_SEC): both truncate toward zero
    delta_ms = int((now - ctx.start_scan) * 1000)
    scan_time = (delta_ms // 1000 if delta_ms >= 0 else -(-delta_ms // 1000)) & ULONG_MAX
    scan_time = scan_time or 1

    cpu_time = cpu_time_ns & ULONG_MAX
    cpu_time_diff_ms = ((cpu_time - ctx.cpu_time) & ULONG_MAX) // NSEC_PER_MSEC
    cpu_percent = (((cpu_time_diff_ms * 100) & ULONG_MAX) // ((scan_time * 1000) & ULONG_MAX)) & UINT_MAX
    cpu_percent = cpu_percent or 1
    last_scan_time = ctx.scan_time or scan_time  # prev_scan_time()

    factor = ((t.advisor_target_scan_time * 100) & ULONG_MAX) // scan_time
    factor = factor or 1

    change = ((scan_time * 100) & ULONG_MAX) // last_scan_time
    change = ewma(ctx.change, change or 1)

    pts = t.pages_to_scan & UINT_MAX
    pages = ((pts * 100) & UINT_MAX) // factor  # unsigned int * int: 32-bit
    pages = ((pages * change) & ULONG_MAX) // 100

    per_page_cost = pts // cpu_percent or 1
    pages = min(pages, (per_page_cost * (t.advisor_max_cpu & UINT_MAX)) & ULONG_MAX)
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
    pages = min(pages, t.advisor_max_pages_to_scan)

    ctx.change, ctx.scan_time, ctx.cpu_time = change, scan_time, cpu_time
    t.pages_to_scan = pages & UINT_MAX
    return AdvisorStep(scan_time, pages, cpu_percent)
