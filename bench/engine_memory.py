"""Engine memory: RSS growth of a process running the LKSM engine, per tracked page.

    sudo .venv/bin/python -m bench.engine_memory [--sizes 64M,256M,1G,4G] [--procs 4]
        [--content unique,zero,few,single] [--share 0.5] [--rounds 3] [--json]

For each memory class (bench.scan_throughput: unique = `share` of the pages equal across
processes, the rest unique; zero; few; single) and size, N stopped pattern processes
(testkit/memchild.py) hold SIZE bytes; then a *fresh* worker process (this script with
``--worker``) imports everything, opens a ProcfsSource scoped to those pids, reads VmRSS, builds
the engine state with `rounds` full scans (Ksm.full_scan, filter off), and reads VmRSS/VmHWM
again.  A fresh process per size, because the Python allocator keeps freed memory: sizes measured
one after another in one process would hide each other's growth.

Printed per class and size: tracked pages (rmap_items = pages_shared + pages_sharing +
pages_unshared + pages_volatile), RSS growth, bytes per tracked page at rest and at the peak
(VmHWM, during the scans) (target <= 64 for both),
scan time and pages/s (the per-page figures should stay flat as sizes grow: linear scaling).
1M tracked pages = 4 GiB of scanned memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    CLASSES,
    check_memory,
    class_specs,
    dump_json,
    human,
    make_specs,
    parse_sizes,
    require_root,
)
from lksmfs.commands.output.tables import print_table
from lksmfs.system.proc import status_kib
from testkit import REPO
from testkit.memproc import PatternGroup


def worker(pids: list[int], rounds: int, mps: int) -> dict[str, Any]:
    """Inside the fresh process: measure RSS around building the engine's state."""
    from lksmfs.engine.ksm import Ksm
    from lksmfs.sources.procfs import ProcfsSource
    from lksmfs.sources.scope import Scope
    from lksmfs.sysfs.attrs import AttributeTable
    from lksmfs.system.memtune import tune_allocator

    tune_allocator()  # as the `lksmfs` command does at start
    with ProcfsSource(scope=Scope(pids=set(pids))) as source:
        rss0 = status_kib("VmRSS")
        hwm0 = status_kib("VmHWM")
        ksm = Ksm(source, filter_enabled=False, self_pid=source.self_pid)
        AttributeTable(ksm).store("max_page_sharing", f"{mps}\n".encode())
        scan_s = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ksm.full_scan()
            scan_s.append(time.perf_counter() - t0)
        rss1 = status_kib("VmRSS")
        hwm1 = status_kib("VmHWM")
        c = ksm.counters()
        rmap = int(c.get("rmap_items") or (
            c["pages_shared"] + c["pages_sharing"] + c["pages_unshared"] + c["pages_volatile"]))
        return {
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "hwm_before_kib": hwm0,
            "hwm_after_kib": hwm1,
            "rmap_items": rmap,
            "pages_scanned": int(c.get("pages_scanned", 0)),
            "pages_shared": c["pages_shared"],
            "pages_sharing": c["pages_sharing"],
            "scan_s": scan_s,
        }


def bench_size(size: int, procs: int, share: float, rounds: int, mps: int, content: str) -> dict[str, Any]:
    specs = make_specs(size, procs, share) if content == "unique" else class_specs(content, size, procs)
    with PatternGroup(specs, timeout_s=600, thp=content == "thp") as group:
        out = subprocess.run(
            [sys.executable, "-m", "bench.engine_memory", "--worker",
             "--pids", ",".join(map(str, group.pids)),
             "--rounds", str(rounds), "--max-page-sharing", str(mps)],
            check=True, capture_output=True, text=True, cwd=REPO,
        )
    res: dict[str, Any] = json.loads(out.stdout)
    rmap = res["rmap_items"] or 1
    grow = (res["rss_after_kib"] - res["rss_before_kib"]) * 1024
    peak = (res["hwm_after_kib"] - res["rss_before_kib"]) * 1024
    total_s = sum(res["scan_s"])
    res.update(
        content=content,
        size=human(size),
        procs=procs,
        rss_growth_bytes=grow,
        bytes_per_page=grow / rmap,
        peak_bytes_per_page=peak / rmap,
        scan_total_s=total_s,
        pages_per_s=(res["pages_scanned"] or rmap * rounds) / total_s if total_s else None,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64M,256M,1G,4G")
    ap.add_argument("--content", default="unique,zero,few,single",
                    help="memory classes (see bench.scan_throughput), comma-separated")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="full scans (3 = LKSM initial rounds)")
    ap.add_argument("--max-page-sharing", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        pids = [int(p) for p in args.pids.split(",") if p]
        print(json.dumps(worker(pids, args.rounds, args.max_page_sharing)))
        return 0
    require_root()
    rows = []
    contents = [c for c in args.content.split(",") if c]
    for c in contents:
        if c not in CLASSES or c == "mixed":
            ap.error(f"--content: {c!r} is not one of unique, zero, few, single")
    for content in contents:
        prev: dict[str, Any] | None = None
        for size in parse_sizes(args.sizes):
            check_memory(size, factor=1.3)
            r = bench_size(size, args.procs, args.share, args.rounds, args.max_page_sharing, content)
            # slope between sizes: the per-page cost without fixed buffers
            r["marginal_bytes_per_page"] = (
                (r["rss_growth_bytes"] - prev["rss_growth_bytes"]) / (r["rmap_items"] - prev["rmap_items"])
                if prev is not None and r["rmap_items"] > prev["rmap_items"] else None)
            rows.append(r)
            prev = r
            if not args.json:
                print(f"# {content} {human(size)} done", file=sys.stderr)
    if args.json:
        dump_json(rows)
        return 0
    print(f"engine memory ({args.rounds} full scans, filter off; unique: share {args.share})")
    print_table(
        ["class", "size", "tracked pages", "RSS growth MiB", "at rest B/page", "marginal B/page",
         "peak B/page", "scan s", "pages/s", "shared", "sharing"],
        [[r["content"], r["size"], r["rmap_items"], r["rss_growth_bytes"] / (1 << 20), r["bytes_per_page"],
          r["marginal_bytes_per_page"], r["peak_bytes_per_page"], r["scan_total_s"],
          r["pages_per_s"], r["pages_shared"], r["pages_sharing"]] for r in rows],
    )
    print()
    print("scaling vs the smallest size of the class (1.0 = linear)")
    base_of: dict[str, dict[str, Any]] = {}
    scaling = []
    for r in rows:
        base = base_of.setdefault(r["content"], r)
        scaling.append([r["content"], r["size"], r["rmap_items"] / base["rmap_items"],
                        r["scan_total_s"] / base["scan_total_s"],
                        (r["scan_total_s"] / base["scan_total_s"]) / (r["rmap_items"] / base["rmap_items"]),
                        r["bytes_per_page"] / base["bytes_per_page"] if base["bytes_per_page"] else None])
    print_table(["class", "size", "pages x", "time x", "time x / pages x", "bytes/page x"], scaling)
    print("target: bytes/page <= 64 (marginal = RSS slope between consecutive sizes, i.e. without"
          " the fixed buffers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
