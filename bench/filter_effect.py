"""What LKSM_FILTER buys and costs on a workload: pages scanned vs sharing kept (issue 5).

Runs `lksmfs.commands.simulate.simulate()` twice on the same workload, filter on and off, and
compares the full scans once every region has matured (the seed filters a region only
when the scan round minus its birth round exceeds LKSM_REGION_MATURE = 5; regions are born
at the first scan, so from scan 6 on).  The seed claims up to 46% less scanning work "at
the expense of somewhat sharing chances"; targets: >= 46% fewer pages scanned per mature
full scan, >= 90% of pages_sharing kept.  Deterministic (virtual clock, simulated memory).

    python -m bench.filter_effect [WORKLOAD] [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lksmfs.commands.simulate import simulate
from lksmfs.engine.regions import LKSM_REGION_MATURE
from lksmfs.workload.schema import load_workload
from testkit import REPO

DEFAULT_WORKLOAD = REPO / "config" / "workloads" / "tizen-tv.yaml"
TARGET_SCAN_CUT = 0.46
TARGET_SHARING_KEPT = 0.90


def mature_full_scans(records: list[dict[str, Any]], after_round: int = 0) -> list[dict[str, Any]]:
    """Full scans in which every region born at the first scan is mature.  Record i is
    scan round i + 1 (each prepared scan is one crawl round); `after_round` further drops
    scans of timeline rounds <= it (to look only at the quiet tail)."""
    return [r for i, r in enumerate(records)
            if r["mode"] == "full" and (i + 1) > LKSM_REGION_MATURE and r["round"] > after_round]


def summarise(records: list[dict[str, Any]], after_round: int) -> dict[str, Any]:
    mature = mature_full_scans(records)
    tail = mature_full_scans(records, after_round)
    if not mature:
        raise SystemExit("no mature full scan: give more --rounds")
    return {
        "mature_full_scans": len(mature),
        "scanned_per_mature_full_scan": sum(r["scanned"] for r in mature) / len(mature),
        "scanned_per_steady_full_scan": (sum(r["scanned"] for r in tail) / len(tail)) if tail else None,
        "scanned_total": sum(r["scanned"] for r in records),
        "pages_sharing": records[-1]["pages_sharing"],
        "pages_shared": records[-1]["pages_shared"],
        "region_share": records[-1].get("region_share", {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", nargs="?", default=str(DEFAULT_WORKLOAD))
    ap.add_argument("--rounds", type=int, default=None,
                    help="timeline rounds to play (default: its last event + 4 quiet rounds)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    last = max((e.round for e in load_workload(args.workload).timeline), default=0)
    rounds = args.rounds if args.rounds is not None else last + 4
    on = summarise(simulate(args.workload, rounds=rounds, filter_enabled=True).scans, last)
    off = summarise(simulate(args.workload, rounds=rounds, filter_enabled=False).scans, last)
    cut = 1 - on["scanned_per_mature_full_scan"] / off["scanned_per_mature_full_scan"]
    kept = on["pages_sharing"] / off["pages_sharing"] if off["pages_sharing"] else 1.0
    steady_cut = None
    if on["scanned_per_steady_full_scan"] and off["scanned_per_steady_full_scan"]:
        steady_cut = 1 - on["scanned_per_steady_full_scan"] / off["scanned_per_steady_full_scan"]
    result = {
        "workload": args.workload, "rounds": rounds, "filter_on": on, "filter_off": off,
        "scan_cut": round(cut, 4), "steady_scan_cut": None if steady_cut is None else round(steady_cut, 4),
        "sharing_kept": round(kept, 4),
        "targets": {"scan_cut": TARGET_SCAN_CUT, "sharing_kept": TARGET_SHARING_KEPT},
        "met": cut >= TARGET_SCAN_CUT and kept >= TARGET_SHARING_KEPT,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{Path(args.workload).name}: {rounds} timeline rounds, "
          f"{on['mature_full_scans']} mature full scans (scan round > {LKSM_REGION_MATURE})")
    print(f"{'':<34} {'filter on':>10} {'filter off':>10} {'on/off':>7}")

    def line(label: str, a: float | None, b: float | None) -> None:
        if a is None or b is None:
            return
        ratio = f"{a / b:.3f}" if b else "-"
        print(f"{label:<34} {a:>10.0f} {b:>10.0f} {ratio:>7}")

    for label, key in (("pages scanned / mature full scan", "scanned_per_mature_full_scan"),
                       (f"  ... after the last event (r>{last})", "scanned_per_steady_full_scan")):
        line(label, on[key], off[key])
    line("pages scanned, whole run", on["scanned_total"], off["scanned_total"])
    line("pages_sharing at the end", on["pages_sharing"], off["pages_sharing"])
    line("pages_shared at the end", on["pages_shared"], off["pages_shared"])
    print(f"fewer pages scanned per mature full scan: {cut:.1%} (target >= {TARGET_SCAN_CUT:.0%}: "
          f"{'met' if cut >= TARGET_SCAN_CUT else 'MISSED'})")
    print(f"sharing kept: {kept:.1%} (target >= {TARGET_SHARING_KEPT:.0%}: "
          f"{'met' if kept >= TARGET_SHARING_KEPT else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
