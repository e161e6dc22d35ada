"""`lksmfs compare`: LKSM against mainline KSM on one workload, in simulated device time.

The workload's timeline is played on a virtual clock - hours of a device's life in
seconds, the same figures on every run - once per policy:

- `lksm`:          run=8, driven as Tizen's resourced drives it: the timeline's freeze/thaw
                   hints and one_shot requests, and resourced's periodic full scan in every
                   round that asks for nothing else (as `lksmfs simulate` plays it);
- `lksm-nofilter`: the same without LKSM_FILTER;
- `lksm-periodic`: run=1: LKSM's own crawler (a full scan every full_scan_interval,
                   partial scans on the freezer's hints);
- `ksm`:           mainline ksmd at its defaults (pages_to_scan 100, sleep_millisecs 20),
                   smart_scan off, every app opted in with prctl(PR_SET_MEMORY_MERGE) -
                   the scope LKSM takes;
- `ksm-smart`:     the same with smart_scan=1 (mainline's default since 6.7).

Time: timeline round R starts at R x --round-minutes; the volatile pages of running apps
change then, and its events happen then.  Every scanner - ksmd and LKSM's - runs
batches of pages_to_scan pages sleep_millisecs apart (a batch takes no time); LKSM's
crawler sleeps and wakes as it asks.  A sample is taken at every simulated minute.
That timing is lksmfs.workload.paced's PacedDriver, the engine driver `simulate` and the
tests use, with the threads paced; this module sets it up per policy and reports.

Mainline's ksmd visits 5,000 pages a simulated second, tens of millions in a few hours:
the slots a pass visits are fast-forwarded when nothing in them can merge or break
(lksmfs.engine.fastpass, exact), and scanned by the engine otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lksmfs.commands.output.helptext import add_command
from lksmfs.commands.output.tables import format_table
from lksmfs.engine.params import POLICY_KSM, POLICY_LKSM
from lksmfs.workload.paced import PacedDriver
from lksmfs.workload.schema import KSM_PRCTL, Workload, WorkloadError, load_workload


@dataclass(frozen=True)
class PolicySpec:
    """One policy of the comparison: the engine's scheduling policy and how it is driven."""

    name: str
    engine: str  # lksm | ksm (Ksm(policy=...))
    filter: bool = True  # LKSM_FILTER
    run: int = 1
    smart_scan: int = 0
    resourced: bool = False  # one_shot requests from the timeline (LKSM in one-shot mode)
    what: str = ""


POLICIES: dict[str, PolicySpec] = {
    s.name: s
    for s in (
        PolicySpec("lksm", POLICY_LKSM, run=8, resourced=True,
                   what="LKSM one-shot mode, driven by the timeline as resourced does"),
        PolicySpec("lksm-nofilter", POLICY_LKSM, filter=False, run=8, resourced=True,
                   what="the same without LKSM_FILTER"),
        PolicySpec("lksm-periodic", POLICY_LKSM, run=1, what="LKSM's own periodic mode (run=1)"),
        PolicySpec("ksm", POLICY_KSM, what="mainline ksmd, defaults, smart_scan off"),
        PolicySpec("ksm-smart", POLICY_KSM, smart_scan=1, what="mainline ksmd with smart_scan"),
    )
}
BASELINE = "ksm"


@dataclass
class PolicyRun:
    """One policy's result: the deterministic figures, and apart from them the wall time."""

    name: str
    samples: list[dict[str, int | float]]
    pages_scanned: int
    pages_sharing_end: int
    pages_sharing_mean: float
    counters: dict[str, int] = field(default_factory=dict)  # the engine's at the end
    wall_s: float = 0.0
    fast_slots: int = 0
    slow_slots: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "pages_scanned": self.pages_scanned,
                "pages_sharing_end": self.pages_sharing_end, "pages_sharing_mean": self.pages_sharing_mean,
                "samples": self.samples}


def opted_in(workload: Workload) -> Workload:
    """Every app of the workload as if it called prctl(PR_SET_MEMORY_MERGE)."""
    return dataclasses.replace(workload, apps=tuple(dataclasses.replace(a, ksm=KSM_PRCTL) for a in workload.apps))


class Player(PacedDriver):
    """One policy over the workload's timeline: the driver with the threads' timing,
    set up as the policy says."""

    def __init__(self, workload: Workload, spec: PolicySpec, *, hours: float, round_minutes: float,
                 fast: bool = True, progress: Callable[[str], None] | None = None) -> None:
        from lksmfs.workload.simulated import SimulatedSource

        self.spec = spec
        super().__init__(SimulatedSource(opted_in(workload) if spec.engine == POLICY_KSM else workload),
                         policy=spec.engine, filter_enabled=spec.filter, end_ms=int(round(hours * 3_600_000)),
                         round_ms=int(round(round_minutes * 60_000)), resourced=spec.resourced, fast=fast,
                         name=spec.name, progress=progress)

    def run(self) -> PolicyRun:
        t0 = time.perf_counter()
        if self.spec.engine == POLICY_KSM:
            self.table.store("smart_scan", f"{self.spec.smart_scan}\n".encode())
        self.table.store("run", f"{self.spec.run}\n".encode())
        samples = self.play()
        c = self.ksm.counters()
        mean = sum(s["pages_sharing"] for s in samples[1:]) / max(1, len(samples) - 1)
        return PolicyRun(self.spec.name, samples, c["pages_scanned"], c["pages_sharing"],
                         round(mean, 3), dict(c), time.perf_counter() - t0,
                         self.scanner.fast_slots, self.scanner.slow_slots)


# -- the whole comparison ---------------------------------------------------------------


@dataclass
class Comparison:
    workload: str
    hours: float
    round_minutes: float
    runs: list[PolicyRun]

    def as_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "hours": self.hours, "policies": [r.as_json() for r in self.runs]}


def _play(args: tuple[str, str, float, float, bool]) -> PolicyRun:
    path, name, hours, minutes, fast = args

    def say(line: str) -> None:
        print(f"compare: {line}", file=sys.stderr, flush=True)

    workload = load_workload(path)
    return Player(workload, POLICIES[name], hours=hours, round_minutes=minutes, fast=fast, progress=say).run()


def compare(workload_path: str, *, hours: float = 4.0, round_minutes: float = 5.0,
            policies: Sequence[str] = tuple(POLICIES), jobs: int | None = None, fast: bool = True) -> Comparison:
    """Play the workload once per policy (in `jobs` processes; the results do not depend
    on how many)."""
    load_workload(workload_path)  # a bad file fails here, once
    work = [(workload_path, name, hours, round_minutes, fast) for name in policies]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        runs = [_play(w) for w in work]
    else:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            runs = list(pool.map(_play, work))
    return Comparison(workload_path, hours, round_minutes, runs)


# -- output ---------------------------------------------------------------------------


def summary_rows(cmp: Comparison) -> tuple[str, list[tuple[object, ...]]]:
    """One row per policy: what it cost and what it saved relative to the baseline
    (`ksm`, else the first policy)."""
    base = next((r for r in cmp.runs if r.name == BASELINE), cmp.runs[0])
    rows: list[tuple[object, ...]] = []
    for r in cmp.runs:
        scan_pct = 100.0 * r.pages_scanned / base.pages_scanned if base.pages_scanned else None
        mean_pct = 100.0 * r.pages_sharing_mean / base.pages_sharing_mean if base.pages_sharing_mean else None
        end_pct = 100.0 * r.pages_sharing_end / base.pages_sharing_end if base.pages_sharing_end else None
        per_saved = r.pages_scanned / r.pages_sharing_mean if r.pages_sharing_mean else None
        scans = r.counters.get("full_scans", 0)
        per_scan = round(r.pages_scanned / scans) if scans else None
        rows.append((r.name, r.pages_scanned, scan_pct, round(r.pages_sharing_mean), mean_pct,
                     r.pages_sharing_end, end_pct, per_saved, scans, per_scan))
    return base.name, rows


def format_summary(cmp: Comparison) -> list[str]:
    base, rows = summary_rows(cmp)

    def pct(v: object) -> object:
        return f"{v:.1f}%" if isinstance(v, float) else v

    lines = format_table(
        ("policy", "pages scanned", f"of {base}'s", "sharing (mean)", f"of {base}'s", "sharing (end)",
         f"of {base}'s", "scanned/saved", "full scans", "scanned/full scan"),
        [(n, s, pct(sp), m, pct(mp), e, pct(ep), ps, fs, pf) for n, s, sp, m, mp, e, ep, ps, fs, pf in rows],
        align="<>>>>>>>>>",
    )
    mib = 4096 / 2**20
    lines.append("")
    lines.append(f"{cmp.workload}, {cmp.hours:g} h simulated, rounds of {cmp.round_minutes:g} min; sharing "
                 f"in pages of 4 KiB (mean: over the per-minute samples); scanned/saved: pages scanned "
                 f"per page of mean sharing; scanned/full scan: what one pass over the memory costs")
    for n, _s, sp, m, mp, _e, _ep, _ps, _fs, _pf in rows:
        if n != base and isinstance(sp, float) and isinstance(mp, float) and isinstance(m, int):
            lines.append(f"  {n}: {sp:.1f}% of {base}'s scanning for {mp:.1f}% of its saving "
                         f"({m * mib:.1f} MiB saved on average)")
    return lines


def write_csv(cmp: Comparison, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("policy", "t_s", "pages_scanned", "pages_sharing"))
        for r in cmp.runs:
            for s in r.samples:
                w.writerow((r.name, s["t_s"], s["pages_scanned"], s["pages_sharing"]))


def plot(cmp: Comparison, path: str) -> None:
    """Two panels over simulated time: pages_sharing, and cumulative pages scanned (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 7.5))
    # the steady state, magnified: every policy gets there in the first minutes
    zoom = top.inset_axes((0.35, 0.12, 0.62, 0.5))
    settled = [s["pages_sharing"] for r in cmp.runs for s in r.samples if float(s["t_s"]) >= cmp.hours * 360]
    for r in cmp.runs:
        hours = [float(s["t_s"]) / 3600 for s in r.samples]
        sharing = [s["pages_sharing"] for s in r.samples]
        top.plot(hours, sharing, label=r.name, linewidth=1.4)
        zoom.plot(hours, sharing, linewidth=1.2)
        pts = [(h, s["pages_scanned"]) for h, s in zip(hours, r.samples, strict=True) if s["pages_scanned"] > 0]
        bottom.plot([h for h, _ in pts], [v for _, v in pts], label=r.name, linewidth=1.4)
    if settled:
        lo, hi = min(settled), max(settled)
        pad = max(5.0, (hi - lo) * 0.15)
        zoom.set_xlim(cmp.hours * 0.1, cmp.hours)
        zoom.set_ylim(lo - pad, hi + pad)
        zoom.set_title("from 10% of the run on", fontsize=8)
        zoom.tick_params(labelsize=7)
        zoom.grid(True, alpha=0.3)
    top.set_ylabel("pages_sharing (4 KiB pages saved)")
    top.set_title(f"{os.path.basename(cmp.workload)}: {cmp.hours:g} h simulated, rounds of {cmp.round_minutes:g} min")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("pages scanned (cumulative)")
    bottom.set_xlabel("simulated time (hours)")
    bottom.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------


EXAMPLES = """\
examples:
  lksmfs compare "$(lksmfs share tizen-tv.yaml)"            # 4 simulated hours, every policy
  lksmfs compare config/workloads/small.yaml --hours 1 --policies lksm,ksm --json
  lksmfs compare config/workloads/tizen-tv.yaml --plot cmp.png --csv cmp.csv

stdout is the same on every run; progress and wall times go to stderr. --plot needs
matplotlib: pip install 'lksmfs[plot]' (make setup installs it).
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "compare",
        help="LKSM against mainline KSM on a workload, in simulated time",
        description="Play a workload's timeline on a virtual clock once per policy - LKSM driven as resourced "
                    "drives it (lksm), without LKSM_FILTER (lksm-nofilter), in its periodic mode "
                    "(lksm-periodic), mainline ksmd at its defaults (ksm) and with smart_scan (ksm-smart) - and "
                    "say what each scanned and saved, relative to ksm. No process, no root needed.",
        examples=EXAMPLES,
    )
    p.add_argument("workload", help="workload YAML (see config/workloads/)")
    p.add_argument("--hours", type=float, default=4.0, help="simulated hours (default 4)")
    p.add_argument("--round-minutes", type=float, default=5.0, metavar="M",
                   help="simulated minutes per timeline round (default 5)")
    p.add_argument("--policies", default=",".join(POLICIES), metavar="LIST",
                   help=f"comma-separated, any of {', '.join(POLICIES)} (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object (samples included)")
    p.add_argument("--plot", metavar="FILE.png", help="draw sharing and pages scanned over time (matplotlib)")
    p.add_argument("--csv", metavar="FILE", help="write every sample: policy,t_s,pages_scanned,pages_sharing")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="policies played at once (default: one per CPU); the figures do not depend on it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        print(f"lksmfs compare: --policies: unknown {', '.join(bad) or '(none given)'} "
              f"(choose from {', '.join(POLICIES)})", file=sys.stderr)
        return 2
    if len(set(names)) != len(names):
        print("lksmfs compare: --policies: a policy is listed twice", file=sys.stderr)
        return 2
    if args.hours <= 0 or args.round_minutes <= 0:
        print("lksmfs compare: --hours and --round-minutes must be positive", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("lksmfs compare: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("lksmfs compare: --plot needs matplotlib: pip install 'lksmfs[plot]' (make setup installs it)",
                  file=sys.stderr)
            return 2
    try:
        cmp = compare(args.workload, hours=args.hours, round_minutes=args.round_minutes, policies=names,
                      jobs=args.jobs)
    except (WorkloadError, OSError) as e:
        print(f"lksmfs compare: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(cmp.as_json()))
    else:
        for line in format_summary(cmp):
            print(line)
    if args.csv:
        write_csv(cmp, args.csv)
    if args.plot:
        plot(cmp, args.plot)
    for r in cmp.runs:
        print(f"compare: {r.name}: {r.wall_s:.1f} s wall ({r.fast_slots} slots fast-forwarded, "
              f"{r.slow_slots} scanned by the engine)", file=sys.stderr)
    return 0
