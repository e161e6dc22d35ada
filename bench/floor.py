"""lksmfs against the read+hash floor and the kernel's KSM, on the same stopped processes.

    sudo .venv/bin/python -m bench.floor [--workload zero,zero-zp,c64,mixed,real]
        [--sizes 1G] [--procs 4] [--max-page-sharing 256] [--repeat 2] [--timeout 600]
        [--tree DIR ...] [--json]

For each workload, on the same processes, in the same run, each one `--repeat` times (the
best time of each is kept):

* floor: bench/floorscan.py as a whole process, Python start-up included: list the present
  anonymous pages (pagemap + kpageflags), read them from /proc/PID/mem in 256 KiB preads,
  xxh3 each 4 KiB page, group the digests with numpy.  Its groups give KSM's counters by
  hand (testkit.patterns.group_counts): they must be lksmfs's;
* lksmfs: ``lksmfs scan --rounds 2 --json`` as a whole process (LKSM's first round records
  checksums, the second merges: on still memory its counters are then final), filter off;
  its peak RSS (ru_maxrss) less the same command's on a process of one page, per tracked
  page;
* kernel: ksmd with pages_to_scan 10000, sleep_millisecs 0, smart_scan 0 and the same
  max_page_sharing / use_zero_pages, from ``run=1`` to convergence
  (testkit.kernel_ksm.KernelKsm.converge, under its flock), then unmerged.

`--tree DIR` runs ``lksmfs scan`` from another checkout's `lksmfs/` (e.g. ``git worktree add
/tmp/main main``); given twice or more, each tree's scans run on the same processes,
interleaved: engines compared on one machine under the same load, one row per tree.

Printed: the three best times, lksmfs / floor and lksmfs / kernel, whether the counters
agree (floor = lksmfs, lksmfs = kernel), and the peak bytes per tracked page.

Workloads (SIZE over `--procs` pattern processes, testkit.memproc.PatternGroup: stopped,
prctl(PR_SET_MEMORY_MERGE), THP off):

* zero: every page zero-filled; zero-zp: the same with use_zero_pages=1;
* c64: 64 contents (bytes 1..64) in runs of 16 pages, cycling: every 2,048-page chunk of
  the engine holds each of them twice;
* mixed: blocks of 512 x F pages (F = SIZE per process / 256 MiB, at least 1; a child's
  spec must fit in one argv string): 128 F `same` (page i equal in every process), 96 F
  unique, 32 F zero-filled, then 64 runs of 4 F pages of bytes 1..64 in an order that
  differs between blocks and processes (not scan_throughput's Tizen `mixed`);
* real: real programs (testkit.programs.RealPrograms: 4 CPython + numpy + matplotlib,
  3 perl, 2 node_exporter if installed; about 300 MiB over 9 processes; SIZE and --procs
  do not apply), scanned with --include-short-tasks (perl and node_exporter burn less
  than LKSM's 100 ms; the kernel, prctl'd, takes them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from bench.common import (
    check_memory,
    class_specs,
    dump_json,
    human,
    parse_sizes,
    pick,
    require_kernel_ksm,
    run_measured,
)
from bench.scan_throughput import COMPARED, kernel_converge
from lksmfs.commands.output.tables import print_table
from lksmfs.system.proc import PAGE_SIZE
from testkit import REPO
from testkit.memproc import PatternGroup
from testkit.patterns import Pages, group_counts
from testkit.programs import RealPrograms

WORKLOADS = ("zero", "zero-zp", "c64", "mixed", "real")
FLOORSCAN = REPO / "bench" / "floorscan.py"
C64_RUN = 16  # pages per run of one content in c64
QUARTER_GIB = 256 << 20


def c64_spec(per: int) -> Pages:
    """64 contents (bytes 1..64) in runs of C64_RUN pages, cycling; `per` pages."""
    runs: list[tuple[int, str | int]] = [(C64_RUN, k % 64 + 1) for k in range(per // C64_RUN)]
    if per % C64_RUN:
        runs.append((per % C64_RUN, 65))
    return runs


def mixed_spec(per: int, proc: int) -> Pages:
    """Blocks of same / unique / zero-filled pages and 64 short runs of bytes 1..64."""
    f = max(1, per * PAGE_SIZE // QUARTER_GIB)
    block = 512 * f
    runs: list[tuple[int, str | int]] = []
    for b in range(per // block):
        runs += [(128 * f, "same"), (96 * f, "unique"), (32 * f, "zero")]
        runs += [(4 * f, (j * 37 + b * 11 + proc * 5) % 64 + 1) for j in range(64)]
    if per % block:
        runs.append((per % block, "unique"))
    return runs


def workload_specs(workload: str, size: int, procs: int) -> list[Pages]:
    per = max(1, size // PAGE_SIZE // procs)
    if workload in ("zero", "zero-zp"):
        return class_specs("zero", size, procs)
    if workload == "c64":
        return [c64_spec(per)] * procs
    if workload == "mixed":
        return [mixed_spec(per, p) for p in range(procs)]
    raise ValueError(workload)


@contextlib.contextmanager
def processes(workload: str, size: int, procs: int, timeout_s: float) -> Iterator[list[int]]:
    """The stopped, kernel-mergeable processes of one workload; their pids."""
    if workload == "real":
        with RealPrograms(timeout_s=timeout_s) as progs:
            yield progs.pids
        return
    with PatternGroup(workload_specs(workload, size, procs), timeout_s=timeout_s) as group:
        yield group.pids


def floor_counters(groups: dict[int, int], zero_pages: int, mps: int, zp: int) -> dict[str, int]:
    """KSM's converged counters from the sizes of the groups of equal pages (a group of
    n pages fills KSM pages of `mps` mappings each, testkit.patterns.group_counts; two
    KSM pages or more of one content are a chain of dups).  With use_zero_pages every
    zero-filled page maps the zero page instead and is in no group."""
    sizes = dict(groups)
    if zp and zero_pages:
        sizes[zero_pages] -= 1
    out = dict.fromkeys((*COMPARED, "pages_unshared", "ksm_zero_pages"), 0)
    out["ksm_zero_pages"] = zero_pages if zp else 0
    for n, count in sizes.items():
        shared, sharing = group_counts(n, mps)
        out["pages_shared"] += shared * count
        out["pages_sharing"] += sharing * count
        if shared >= 2:
            out["stable_node_chains"] += count
            out["stable_node_dups"] += shared * count
        out["pages_unshared"] += (n - shared - sharing) * count
    return out


def run_floor(pids: Sequence[int]) -> dict[str, Any]:
    out, err, rc, wall, maxrss = run_measured([sys.executable, str(FLOORSCAN), *map(str, pids)], str(REPO))
    if rc != 0:
        raise RuntimeError(f"floorscan failed ({rc}): {err.decode(errors='replace')[-2000:]}")
    got: dict[str, Any] = json.loads(out)
    got["groups"] = {int(k): int(v) for k, v in got["groups"].items()}
    got["command_s"] = wall
    return got


def run_lksmfs(pids: Sequence[int], mps: int, zp: int, short: bool, tree: str = str(REPO)) -> dict[str, Any]:
    """``lksmfs scan --rounds 2 --json --no-filter`` as a whole process, run from `tree`
    (``python -m`` takes that tree's `lksmfs/` first)."""
    cmd = [sys.executable, "-m", "lksmfs.cli", "scan", "--rounds", "2", "--json", "--no-filter",
           "--set", f"max_page_sharing={mps}", "--set", f"use_zero_pages={zp}"]
    cmd += ["--include-short-tasks"] if short else []
    for pid in pids:
        cmd += ["--pid", str(pid)]
    out, err, rc, wall, maxrss = run_measured(cmd, tree)
    if rc != 0:
        raise RuntimeError(f"lksmfs scan failed ({rc}): {err.decode(errors='replace')[-2000:]}")
    got: dict[str, Any] = json.loads(out)
    got["command_s"] = wall
    got["maxrss_kib"] = maxrss
    return got


def bench_one(workload: str, size: int, procs: int, mps: int, repeat: int, timeout_s: float,
              rss0: dict[str, int], trees: Sequence[str]) -> list[dict[str, Any]]:
    """One workload: the floor, lksmfs from each tree (their runs interleaved, so that load
    hits them alike) and the kernel, `repeat` times each; one row per tree."""
    zp = int(workload == "zero-zp")
    keys = (*COMPARED, "ksm_zero_pages")
    with processes(workload, size, procs, timeout_s) as pids:
        nr = len(pids)
        floors = [run_floor(pids) for _ in range(repeat)]
        lks: dict[str, list[dict[str, Any]]] = {t: [] for t in trees}
        for _ in range(repeat):
            for t in trees:
                lks[t].append(run_lksmfs(pids, mps, zp, workload == "real", t))
        kerns = [kernel_converge(mps, zp, pids, timeout_s) for _ in range(repeat)]
    fl = [floor_counters(f["groups"], f["zero_pages"], mps, zp) for f in floors]
    floor_s = min(f["command_s"] for f in floors)
    kernel_s = min(k["converge_s"] for k in kerns)
    foreign = sorted({p for k in kerns for p in k["foreign"]})
    rows = []
    for t in trees:
        runs = lks[t]
        lksmfs_s = min(r["command_s"] for r in runs)
        items = sum(int(runs[0][k]) for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))
        row: dict[str, Any] = {
            "workload": workload, "size": "-" if workload == "real" else human(size), "tree": t,
            "max_page_sharing": mps, "use_zero_pages": zp, "nr_processes": nr,
            "pages": floors[0]["pages"],
            "floor_s": floor_s,
            "floor_scan_s": min(f["scan_s"] for f in floors),
            "lksmfs_s": lksmfs_s,
            "lksmfs_scan_s": min(r["wall_s"] for r in runs),
            "kernel_s": kernel_s,
            "vs_floor": lksmfs_s / floor_s,
            "vs_kernel": lksmfs_s / kernel_s if kernel_s else None,
            "floor_equal": all(f[k] == int(r.get(k, 0)) for f in fl for r in runs for k in keys),
            "kernel_equal": all(int(r.get(k, 0)) == int(k_.get(k, 0)) for r in runs for k_ in kerns for k in keys),
            "rmap_items": items,
            "peak_b_per_page": max(0, min(r["maxrss_kib"] for r in runs) - rss0[t]) * 1024 / items if items else None,
            "floor": fl[0],
            "lksmfs": {k: runs[0].get(k) for k in (*keys, "pages_unshared", "pages_volatile")},
            "kernel": {k: kerns[0].get(k) for k in (*keys, "pages_unshared", "pages_volatile", "full_scans_run")},
            "times": {"floor": [f["command_s"] for f in floors], "lksmfs": [r["command_s"] for r in runs],
                      "kernel": [k["converge_s"] for k in kerns]},
        }
        if foreign:
            row["note"] = f"other mergeable pids {foreign}: the kernel's counters include them"
        rows.append(row)
    return rows


def baseline_rss(mps: int, zp: int, timeout_s: float, tree: str) -> int:
    """ru_maxrss (KiB) of the same lksmfs command over a process of a single page."""
    with PatternGroup([[(1, 0x77)]], timeout_s=timeout_s) as group:
        return int(run_lksmfs(group.pids, mps, zp, False, tree)["maxrss_kib"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default=",".join(WORKLOADS), help="workloads, comma-separated")
    ap.add_argument("--sizes", default="1G", help="total sizes of the pattern workloads, e.g. 1G,4G")
    ap.add_argument("--procs", type=int, default=4, help="processes of the pattern workloads")
    ap.add_argument("--max-page-sharing", type=int, default=256, help="for lksmfs and the kernel")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best time is kept")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline per phase, seconds")
    ap.add_argument("--tree", action="append", help="run `lksmfs scan` from this checkout (repeatable: "
                    "each on the same processes, interleaved; default: this repository)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    require_kernel_ksm()
    workloads = pick(ap, "--workload", args.workload, WORKLOADS)
    rows: list[dict[str, Any]] = []
    trees = args.tree or [str(REPO)]
    rss0: dict[int, dict[str, int]] = {}
    for w in workloads:
        for size in parse_sizes(args.sizes) if w != "real" else [0]:
            if size:
                check_memory(size)
            zp = int(w == "zero-zp")
            if zp not in rss0:
                rss0[zp] = {t: baseline_rss(args.max_page_sharing, zp, args.timeout, t) for t in trees}
            for row in bench_one(w, size, args.procs, args.max_page_sharing, max(1, args.repeat),
                                 args.timeout, rss0[zp], trees):
                rows.append(row)
                print(f"# {w} {row['size']} {row['tree']}: floor {row['floor_s']:.2f} s, lksmfs "
                      f"{row['lksmfs_s']:.2f} s, kernel {row['kernel_s']:.2f} s; x floor {row['vs_floor']:.2f}, "
                      f"x kernel {row['vs_kernel']:.2f}", file=sys.stderr)
                # each row as soon as it is measured: kept if a later one fails
                print("# row " + json.dumps(row, sort_keys=True), file=sys.stderr, flush=True)
    if args.json:
        dump_json(rows)
        return 0
    print(f"best of {args.repeat}, whole processes (start-up included); kernel: "
          "ksmd converging (pages_to_scan 10000, sleep 0, smart_scan 0)")
    print_table(
        ["workload", "size", "tree", "procs", "pages", "floor s", "lksmfs s", "(scan s)", "kernel s",
         "x floor", "x kernel", "=floor", "=kernel", "peak B/page"],
        [[r["workload"], r["size"], os.path.basename(r["tree"]), r["nr_processes"], r["pages"], r["floor_s"],
          r["lksmfs_s"], r["lksmfs_scan_s"], r["kernel_s"], r["vs_floor"], r["vs_kernel"], r["floor_equal"],
          r["kernel_equal"], r["peak_b_per_page"]] for r in rows],
    )
    print("counters (floor's by hand from its groups / lksmfs / kernel):")
    for r in rows:
        print(f"  {r['workload']} {r['size']} ({r['tree']}): floor {r['floor']}")
        print(f"  {' ' * len(r['workload'])} {' ' * len(r['size'])}  lksmfs {r['lksmfs']}")
        print(f"  {' ' * len(r['workload'])} {' ' * len(r['size'])}  kernel {r['kernel']}")
        if "note" in r:
            print(f"  note: {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
