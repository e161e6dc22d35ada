"""Scan throughput: `lksmfs scan` against the kernel's KSM converging, on the same memory.

    sudo .venv/bin/python -m bench.scan_throughput [--content unique,zero,few,single,mixed]
        [--sizes 256M,1G,4G] [--procs 4] [--max-page-sharing 256,100000]
        [--use-zero-pages 0,1] [--timeout 600] [--json]

For each memory class, size and setting, N stopped processes hold SIZE bytes in total, and
on those same processes, in the same run:

* lksmfs: the command ``lksmfs scan --pid ... --rounds 2 --json`` as a subprocess, start-up
  included (2 rounds: LKSM's first round only records checksums, the second merges, so
  its counters after round 2 are final on memory that does not move); its wall time, its
  scan time (in-process), and its peak RSS (ru_maxrss) minus the same command's on a
  process of one page, per tracked page (rmap item);
* the kernel: ksmd with pages_to_scan 10000, sleep_millisecs 0, smart_scan 0 and the same
  max_page_sharing / use_zero_pages, from ``run=1`` to convergence
  (testkit.kernel_ksm.KernelKsm.converge: the final counters first seen at a full-scan
  boundary), then unmerged.

`ratio` = lksmfs's time to the kernel's converged counters (the command's wall time) over
the kernel's convergence time (target <= 1.0, stretch <= 0.5); `equal` says whether
pages_shared, pages_sharing, stable_node_chains, stable_node_dups (and ksm_zero_pages
with use_zero_pages=1) are the kernel's.

Memory classes (SIZE split over the processes):

* unique: half of each process's pages are `same` (page i equal in every process), half
  unique: the pattern of the original bench;
* zero: every page written with zeros (not the shared zero page);
* few: 48 distinct contents, repeated within and across processes;
* single: LTP style: every page of a process holds one byte value; two processes share one;
* thp: the `few` class, one of its contents zero-filled, in transparent huge pages
  (madvise(MADV_HUGEPAGE)): a merge splits a huge page first and takes its zero-filled
  pages away; lksmfs scans 3 rounds (two pages of one huge page merge a round later);
* mixed: config/workloads/tizen-tv.yaml spawned as real processes (its page counts scaled
  to SIZE), LKSM_FILTER on.  Its helper apps burn less than 100 ms of CPU, which LKSM
  rightly skips and the kernel (prctl PR_SET_MEMORY_MERGE) does not: the scan runs with
  --include-short-tasks so both see the same memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from bench.common import (
    CLASSES,
    check_memory,
    class_specs,
    dump_json,
    human,
    parse_sizes,
    pick,
    require_kernel_ksm,
    run_measured,
)
from lksmfs.commands.output.tables import print_table
from lksmfs.system.proc import PAGE_SIZE
from testkit import REPO
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PatternGroup

COMPARED = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
TIZEN = REPO / "config" / "workloads" / "tizen-tv.yaml"


@contextlib.contextmanager
def processes(content: str, size: int, procs: int, timeout_s: float) -> Iterator[list[int]]:
    """The stopped, kernel-mergeable processes of one class; their pids."""
    if content != "mixed":
        with PatternGroup(class_specs(content, size, procs), timeout_s=timeout_s, thp=content == "thp") as group:
            yield group.pids
        return
    from lksmfs.workload.schema import load_workload, parse_workload
    from lksmfs.workload.spawn import spawn_workload

    wl = load_workload(str(TIZEN))
    data = scale_workload(wl.to_dict(), size / (workload_pages(wl) * PAGE_SIZE))
    with spawn_workload(parse_workload(data, str(TIZEN)), timeout=timeout_s, kernel_merge=True) as w:
        yield w.pids()


def workload_pages(wl: Any) -> int:
    """Anonymous pages of a workload's initial instances (libraries' .data/.bss, heap,
    stack, anonymous pools)."""
    libs = {lib.name: lib for lib in wl.libraries}
    total = 0
    for app in wl.apps:
        per = sum(libs[n].data_pages + libs[n].bss_pages for n in app.libraries)
        per += app.heap.pages + app.stack.pages + sum(a.pages for a in app.anon)
        total += per * app.count
    return total


def scale_workload(data: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same workload with every section `factor` times larger (stacks excepted)."""
    def s(n: int) -> int:
        return max(1, round(n * factor)) if n else 0

    for lib in data.get("libraries", []):
        for key in ("data_pages", "bss_pages"):
            if key in lib:
                lib[key] = s(int(lib[key]))
    for app in data.get("apps", []):
        if "heap" in app:
            app["heap"]["pages"] = s(int(app["heap"]["pages"]))
        for a in app.get("anon", []):
            a["pages"] = s(int(a["pages"]))
    return data


def _run_measured(cmd: list[str]) -> tuple[bytes, bytes, int, float, int]:
    """Run `cmd` from the repository root; (stdout, stderr, status, wall seconds, ru_maxrss KiB)."""
    return run_measured(cmd, REPO)


def scan_command(pids: Sequence[int], mps: int, zp: int, mixed: bool, rounds: int = 2) -> dict[str, Any]:
    """`lksmfs scan --rounds N --json` as a subprocess: its JSON, wall time, ru_maxrss.
    The mixed class scans with the filter and short tasks (module docstring)."""
    cmd = [sys.executable, "-m", "lksmfs.cli", "scan", "--rounds", str(rounds), "--json",
           "--set", f"max_page_sharing={mps}", "--set", f"use_zero_pages={zp}"]
    cmd += ["--include-short-tasks"] if mixed else ["--no-filter"]
    for pid in pids:
        cmd += ["--pid", str(pid)]
    out, err, rc, wall, maxrss = _run_measured(cmd)
    if rc != 0:
        raise RuntimeError(f"lksmfs scan failed ({rc}): {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    result["command_s"] = wall
    result["maxrss_kib"] = maxrss
    return result


def baseline_rss(mps: int, zp: int, mixed: bool, timeout_s: float) -> int:
    """ru_maxrss (KiB) of the same command over a process of a single page."""
    with PatternGroup([[(1, 0x77)]], timeout_s=timeout_s) as group:
        return int(scan_command(group.pids, mps, zp, mixed)["maxrss_kib"])


def kernel_converge(mps: int, zp: int, pids: Sequence[int], timeout_s: float) -> dict[str, Any]:
    with KernelKsm() as k:
        foreign = k.foreign_mergeable(pids)
        k.configure(pages_to_scan=10000, sleep_millisecs=0, smart_scan=0,
                    max_page_sharing=mps, use_zero_pages=zp)
        conv = k.converge(timeout_s=timeout_s)
        out = dict(conv.counters)
        out["converge_s"] = conv.wall_s
        out["full_scans_run"] = conv.full_scans
        out["foreign"] = foreign
        k.unmerge(timeout_s=timeout_s)
    return out


def bench_one(content: str, size: int, procs: int, mps: int, zp: int, timeout_s: float,
              rss0: int) -> dict[str, Any]:
    mixed = content == "mixed"
    row: dict[str, Any] = {"content": content, "size": human(size), "procs": procs,
                           "max_page_sharing": mps, "use_zero_pages": zp, "filter": mixed}
    t0 = time.monotonic()
    with processes(content, size, procs, timeout_s) as pids:
        row["spawn_s"] = time.monotonic() - t0
        row["nr_processes"] = len(pids)
        lk = scan_command(pids, mps, zp, mixed, rounds=3 if content == "thp" else 2)
        kern = kernel_converge(mps, zp, pids, timeout_s)
    keys = COMPARED + (("ksm_zero_pages",) if zp else ())
    items = sum(int(lk[k]) for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))
    row.update(
        lksmfs_s=lk["command_s"],
        lksmfs_scan_s=lk["wall_s"],
        kernel_s=kern["converge_s"],
        ratio=lk["command_s"] / kern["converge_s"] if kern["converge_s"] else None,
        equal=all(int(lk[k]) == int(kern.get(k, 0)) for k in keys),
        rmap_items=items,
        thp_pages=lk.get("thp_pages", 0),
        peak_b_per_page=(lk["maxrss_kib"] - rss0) * 1024 / items if items else None,
        lksmfs={k: lk.get(k) for k in (*keys, "pages_unshared", "pages_volatile")},
        kernel={k: kern.get(k) for k in (*keys, "pages_unshared", "pages_volatile", "full_scans_run")},
    )
    if kern["foreign"]:
        row["note"] = f"other mergeable pids {kern['foreign']}: the kernel's counters include them"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--content", default=",".join(CLASSES), help="memory classes, comma-separated")
    ap.add_argument("--sizes", default="256M,1G,4G", help="total sizes, e.g. 256M,1G,4G")
    ap.add_argument("--procs", type=int, default=4, help="processes of the synthetic classes")
    ap.add_argument("--max-page-sharing", default="256,100000", help="values to run, comma-separated")
    ap.add_argument("--use-zero-pages", default="0,1", help="values to run for the zero class")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline per phase, seconds")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    require_kernel_ksm()
    contents = pick(ap, "--content", args.content, CLASSES)
    mpss = [int(x) for x in args.max_page_sharing.split(",") if x]
    zps = [int(x) for x in args.use_zero_pages.split(",") if x]
    rows: list[dict[str, Any]] = []
    baselines: dict[tuple[int, int, bool], int] = {}
    for content in contents:
        for size in parse_sizes(args.sizes):
            check_memory(size, factor=2.0 if content == "mixed" else 1.5)
            for mps in mpss:
                for zp in zps if content in ("zero", "thp") else [0]:
                    key = (mps, zp, content == "mixed")
                    if key not in baselines:
                        baselines[key] = baseline_rss(mps, zp, key[2], args.timeout)
                    row = bench_one(content, size, args.procs, mps, zp, args.timeout, baselines[key])
                    rows.append(row)
                    print(f"# {content} {row['size']} mps={mps} zp={zp}: lksmfs {row['lksmfs_s']:.2f} s, "
                          f"kernel {row['kernel_s']:.2f} s, ratio {row['ratio']:.2f}, equal {row['equal']}",
                          file=sys.stderr)
    if args.json:
        dump_json(rows)
        return 0
    print("lksmfs scan --rounds 2 (start-up included) against the kernel's KSM converging "
          "(pages_to_scan 10000, sleep 0, smart_scan 0)")
    print_table(
        ["class", "size", "mps", "zp", "pages", "lksmfs s", "(scan s)", "kernel s", "ratio", "equal",
         "peak B/page"],
        [[r["content"], r["size"], r["max_page_sharing"], r["use_zero_pages"], r["rmap_items"],
          r["lksmfs_s"], r["lksmfs_scan_s"], r["kernel_s"], r["ratio"], r["equal"], r["peak_b_per_page"]]
         for r in rows],
    )
    for r in rows:
        if not r["equal"]:
            print(f"counters differ ({r['content']} {r['size']} mps={r['max_page_sharing']} "
                  f"zp={r['use_zero_pages']}): lksmfs {r['lksmfs']} kernel {r['kernel']}")
        if "note" in r:
            print(f"note ({r['content']} {r['size']}): {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
