"""Scan throughput: lksmfs cold full scans vs the kernel's KSM converging on the same processes.

    sudo .venv/bin/python -m bench.scan_throughput [--sizes 256M,1G] [--procs 4] [--share 0.5]
                                                   [--max-page-sharing 256] [--json]

For each size, N stopped pattern processes (testkit/memchild.py) hold SIZE bytes in total; a
`share` fraction of each process's pages equal the same pages in the others, the rest is unique.
Measured on the same stopped processes:

* lksmfs: `scan_processes(rounds=1)` (one cold full scan: every page read and hashed) and the
  default `rounds=3` (the LKSM initial rounds, after which merges are complete);
* kernel: ksmd with pages_to_scan=10000, sleep_millisecs=0, smart_scan=0 from ``run=1`` to
  convergence (`KernelKsm.converge`: final counters first seen at a full-scan boundary), plus the
  time of its first 3 full scans; then ``run=2``.

ratios: lksmfs time to its final counters (converge, the kernel's own definition), one cold
full scan, and the 3 initial rounds, each over the kernel's convergence time (target <= 1.0).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.common import (
    MIB,
    check_memory,
    dump_json,
    human,
    lksmfs_scan,
    make_specs,
    parse_sizes,
    pattern_expected,
    require_root,
)
from lksmfs.system.proc import PAGE_SIZE
from lksmfs.tables import print_table
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PatternGroup


def bench_size(size: int, procs: int, share: float, mps: int, timeout_s: float) -> dict[str, Any]:
    """One size: start the children, scan with lksmfs, converge the kernel, unmerge, clean up."""
    specs = make_specs(size, procs, share)
    npages = sum(c for spec in specs for c, _ in spec)
    row: dict[str, Any] = {
        "size": human(size),
        "procs": procs,
        "share": share,
        "pattern_pages": npages,
        "max_page_sharing": mps,
        "pattern_expected": pattern_expected(specs, mps),
    }
    t0 = time.monotonic()
    with PatternGroup(specs, timeout_s=timeout_s) as group:
        row["spawn_s"] = time.monotonic() - t0
        for rounds in (1, 3):
            counters, why = lksmfs_scan(group.pids, rounds, mps)
            key = f"lksmfs_r{rounds}"
            if counters is None:
                row[key] = None
                row["lksmfs_note"] = why
                continue
            wall = float(counters["wall_s"])
            scanned = int(counters.get("pages_scanned") or npages * rounds)  # all rounds
            scans = counters.get("scans", [])
            final = (counters.get("pages_shared"), counters.get("pages_sharing"))
            # converged as the kernel side defines it: the end of the first round whose
            # pages_shared/pages_sharing are already the final ones
            conv_s = None
            for i, x in enumerate(scans):
                if (x.get("pages_shared"), x.get("pages_sharing")) == final:
                    conv_s = sum(float(y["wall_s"]) for y in scans[: i + 1])
                    break
            row[key] = {
                "wall_s": wall,
                "converge_s": conv_s,
                "pages": scanned // rounds,
                "scan_s": [round(float(x["wall_s"]), 4) for x in counters.get("scans", [])],
                "pages_per_s": scanned / wall if wall else None,
                "mb_per_s": scanned * PAGE_SIZE / MIB / wall if wall else None,
                "pages_shared": counters.get("pages_shared"),
                "pages_sharing": counters.get("pages_sharing"),
            }
        with KernelKsm() as k:
            foreign = k.foreign_mergeable(group.pids)
            if foreign:
                row["kernel_note"] = f"other mergeable pids {foreign}: counters include them"
            k.configure(pages_to_scan=10000, sleep_millisecs=0, smart_scan=0,
                        max_page_sharing=mps, use_zero_pages=0)
            conv = k.converge(timeout_s=timeout_s)
            c = conv.counters
            rmap = c["pages_shared"] + c["pages_sharing"] + c["pages_unshared"] + c[
                "pages_volatile"]
            t1 = time.monotonic()
            k.unmerge(timeout_s=timeout_s)
            row["kernel"] = {
                "converge_s": conv.wall_s,
                "confirmed_s": conv.confirmed_s,
                "scans3_s": conv.scans3_s,
                "full_scans": conv.full_scans,
                "unmerge_s": time.monotonic() - t1,
                "rmap_items": rmap,
                "pages_per_s": rmap * 3 / conv.scans3_s if conv.scans3_s else None,
                "pages_shared": c["pages_shared"],
                "pages_sharing": c["pages_sharing"],
                "pages_unshared": c["pages_unshared"],
                "stable_node_chains": c.get("stable_node_chains", 0),
                "stable_node_dups": c.get("stable_node_dups", 0),
            }
    lk1 = row.get("lksmfs_r1")
    lk3 = row.get("lksmfs_r3")
    kern = row["kernel"]
    kc = kern["converge_s"]
    row["ratio_converge"] = lk3["converge_s"] / kc if lk3 and lk3.get("converge_s") and kc else None
    row["ratio_cold_scan"] = lk1["wall_s"] / kc if lk1 and kc else None
    row["ratio"] = lk3["wall_s"] / kc if lk3 and kc else None
    row["ratio_3scans"] = lk3["wall_s"] / kern["scans3_s"] if lk3 and kern["scans3_s"] else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G", help="total sizes, e.g. 64M,256M,1G")
    ap.add_argument("--procs", type=int, default=4, help="pattern processes per size")
    ap.add_argument("--share", type=float, default=0.5, help="fraction of pages shared")
    ap.add_argument("--max-page-sharing", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline per phase, seconds")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    require_root()
    ok, why = KernelKsm.available()
    if not ok:
        print(f"kernel KSM unavailable: {why}", file=sys.stderr)
        return 2
    rows = []
    for size in parse_sizes(args.sizes):
        check_memory(size)
        rows.append(bench_size(size, args.procs, args.share, args.max_page_sharing, args.timeout))
        if not args.json:
            print(f"# {human(size)} done", file=sys.stderr)
    if args.json:
        dump_json(rows)
        return 0

    def lk(r: dict[str, Any], rounds: int, key: str) -> object:
        v = r.get(f"lksmfs_r{rounds}")
        return v[key] if v else None

    print("lksmfs (scan_processes, filter off)")
    print_table(
        ["size", "procs", "pages", "r1 s", "r1 pages/s", "r1 MB/s", "converge s", "r3 s", "r3 pages/s",
         "shared", "sharing"],
        [[r["size"], r["procs"], lk(r, 1, "pages"), lk(r, 1, "wall_s"), lk(r, 1, "pages_per_s"),
          lk(r, 1, "mb_per_s"), lk(r, 3, "converge_s"), lk(r, 3, "wall_s"), lk(r, 3, "pages_per_s"),
          lk(r, 3, "pages_shared"), lk(r, 3, "pages_sharing")] for r in rows],
    )
    print()
    print("kernel KSM (pages_to_scan 10000, sleep 0, smart_scan 0)")
    print_table(
        ["size", "rmap_items", "converge s", "3 scans s", "pages/s", "shared", "sharing",
         "hand shared", "hand sharing", "unmerge s"],
        [[r["size"], r["kernel"]["rmap_items"], r["kernel"]["converge_s"],
          r["kernel"]["scans3_s"], r["kernel"]["pages_per_s"], r["kernel"]["pages_shared"],
          r["kernel"]["pages_sharing"], r["pattern_expected"][0], r["pattern_expected"][1],
          r["kernel"]["unmerge_s"]] for r in rows],
    )
    print("(hand = pattern pages only; the kernel adds the children's runtime pages)")
    print()
    print("ratios against the kernel's converge time (target <= 1.0):")
    print("  converge = lksmfs time to its final counters (same definition as the kernel's)")
    print("  cold scan = one lksmfs full scan (r1);  r3 = LKSM's 3 initial rounds")
    print("  r3 / 3 scans = r3 against the kernel's time for 3 full scans (the same work)")
    print_table(["size", "converge", "cold scan", "r3", "r3 / 3 scans", "counters equal"],
                [[r["size"], r["ratio_converge"], r["ratio_cold_scan"], r["ratio"], r["ratio_3scans"],
                  None if not r.get("lksmfs_r3") else
                  (lk(r, 3, "pages_shared"), lk(r, 3, "pages_sharing"))
                  == (r["kernel"]["pages_shared"], r["kernel"]["pages_sharing"])]
                 for r in rows])
    for r in rows:
        for note in ("lksmfs_note", "kernel_note"):
            if note in r:
                print(f"note ({r['size']}): {r[note]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
