#!/usr/bin/env python3
"""`make run`: LKSM in shadow mode over a Tizen-TV-like workload, end to end.

1. spawn the workload as real processes (lksmfs.workload.spawn), one cgroup per instance;
2. mount the lksmfs daemon (`python -m lksmfs.cli mount`) scoped to the workload's cgroups;
3. let scripts/resourced-emu.sh drive a device's life through the mounted sysfs files
   (boot with 3 initial full scans, an app to the background = freeze + partial scan, a
   periodic full scan, a low-memory full scan, the app back to the foreground), then a
   few more full scans (`echo 2 > one_shot_scanning`) so that LKSM_FILTER regions mature;
4. print a table per step, then the workload model's expectation next to what was
   measured.  Everything started is torn down on success, error, SIGINT and SIGTERM.

Per-step figures must be read between two steps, while nothing scans.  The script runs
on its own, so the demo hands it a directory of symlinks to the mount in which
`pages_sharing` is a FIFO: the script's report blocks on it right after each step, the
demo reads every counter from the mount, then passes the true pages_sharing on.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from lksmfs.commands.output.tables import print_table
from lksmfs.daemon.mounted import MountedDaemon, read_attr
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import INITIAL_ROUND
from lksmfs.engine.regions import LKSM_REGION_MATURE
from lksmfs.sources.base import PAGE_SHIFT, PAGE_SIZE
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.ranges import RangeFilteredSource
from lksmfs.sources.scope import Scope
from lksmfs.sysfs.attrs import AttributeTable, apply_settings
from lksmfs.system import cgroups
from lksmfs.system.proc import AccessDenied, ProcessGone
from lksmfs.system.proc import rss_anon_pages as task_rss_anon_pages
from lksmfs.system.waiting import wait_until
from lksmfs.workload.schema import Workload, WorkloadError, load_workload
from lksmfs.workload.simulated import ExpectedSharing, SimulatedSource
from lksmfs.workload.spawn import SpawnedWorkload, spawn_workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKLOAD = os.path.join(REPO, "config", "workloads", "tizen-tv.yaml")
EMU = os.path.join(REPO, "scripts", "resourced-emu.sh")
REGION_BIRTH_ROUND = 0  # see filter_state()
MATURE_FROM = REGION_BIRTH_ROUND + LKSM_REGION_MATURE + 1
# the attributes read at every step boundary
SNAP_ATTRS = ("pages_shared", "pages_sharing", "pages_scanned", "full_scans", "region_share",
              "nr_regions", "scanning_process", "one_shot_scanning")
REGION_KEYS = ("heap", "file_data", "file_bss", "conflicted")


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: unwind through every cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DemoError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()


# -- the daemon -------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted_daemon(mountpoint: str, cgroup: str, settings: dict[str, int],
                   log_path: str, timeout: float) -> Iterator[MountedDaemon]:
    """`lksmfs mount MOUNTPOINT --cgroup CGROUP`, in a session of its own (Ctrl-C reaches
    the demo, which stops it in order); stopped and unmounted on the way out, whatever
    happened."""
    os.makedirs(mountpoint, exist_ok=True)
    args = ["--cgroup", cgroup, *(a for n, v in settings.items() for a in ("--set", f"{n}={v}"))]
    with MountedDaemon(mountpoint, args, log_path, own_session=True) as daemon:
        daemon.wait_serving(timeout)
        yield daemon


def snapshot(mountpoint: str) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for name in SNAP_ATTRS:
        try:
            text = read_attr(mountpoint, name).strip()
        except FileNotFoundError:  # no LKSM_FILTER: no region files
            continue
        if name == "region_share":
            snap[name] = {k: int(v) for k, v in (w.split(":") for w in text.split())}
        else:
            snap[name] = int(text)
    return snap


# -- the step gate ------------------------------------------------------------------------------


class ReportGate:
    """A directory the emulator takes for the KSM sysfs dir: symlinks to the mount, except
    `pages_sharing`, a FIFO served by a thread.  Every report of the script opens it right
    after a step's scan, so each snapshot is taken exactly between two steps."""

    LINKED = ("run", "full_scans", "one_shot_scanning", "region_share", "pages_scanned")

    def __init__(self, directory: str, mountpoint: str) -> None:
        self.dir = directory
        self.mountpoint = mountpoint
        self.snaps: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        os.makedirs(directory)
        for name in self.LINKED:
            target = os.path.join(mountpoint, name)
            if os.path.exists(target):
                os.symlink(target, os.path.join(directory, name))
        self.fifo = os.path.join(directory, "pages_sharing")
        os.mkfifo(self.fifo, 0o600)
        self._thread = threading.Thread(target=self._serve, name="report-gate", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                fd = os.open(self.fifo, os.O_WRONLY)  # blocks until the script reads
                try:
                    if self._stop.is_set():
                        return
                    snap = snapshot(self.mountpoint)
                    snap["t"] = time.monotonic()
                    self.snaps.append(snap)
                    os.write(fd, f"{snap['pages_sharing']}\n".encode())
                    # a fresh FIFO for the next report before this reader sees EOF: a
                    # reopened old one would feed the still-open `cat` a second time
                    fresh = self.fifo + ".next"
                    os.mkfifo(fresh, 0o600)
                    os.replace(fresh, self.fifo)
                finally:
                    os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # a reader end unblocks a writer waiting in open()
            fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            self._thread.join(5)
            os.close(fd)
        self._thread.join(5)


# -- the workload's own pages, measured ---------------------------------------------------------


def measure_workload_pages(procs: SpawnedWorkload) -> dict[str, Any]:
    """The engine, in this process, over the workload's own pages of the live children:
    3 full scans (LKSM's initial rounds: every merge is done by then), no filter, no
    max_page_sharing limit, i.e. the model's assumptions."""
    ranges = {}
    for inst in procs.live():
        ranges[inst.pid] = [(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + n)
                            for addr, n in inst.sections.values()]
    src = RangeFilteredSource(ProcfsSource(scope=Scope(pids=set(ranges))), ranges)
    try:
        ksm = Ksm(src, filter_enabled=False, self_pid=os.getpid())
        apply_settings(AttributeTable(ksm), {"max_page_sharing": 1_000_000_000})
        t = time.perf_counter()
        scans = [ksm.full_scan() for _ in range(INITIAL_ROUND)]
        c = ksm.counters()
        return {"pages_shared": c["pages_shared"], "pages_sharing": c["pages_sharing"],
                "pages_scanned": int(scans[0]["pages_scanned"]),
                "slots": int(scans[0]["slots_scanned"]), "wall_s": time.perf_counter() - t,
                "pids": sorted(int(row["pid"]) for row in ksm.per_process())}
    finally:
        src.close()


def model_expectation(workload: Workload, frozen_app: str) -> ExpectedSharing:
    """SimulatedSource.expected_sharing over the same instances in the same state (round 0,
    the app frozen: freezing changes no content), short tasks left out as LKSM does."""
    sim = SimulatedSource(workload)
    sim.freeze(frozen_app)
    sim.thaw(frozen_app)
    return sim.expected_sharing(skip_short=True)


def rss_anon_pages(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(ProcessGone, AccessDenied):
            total += task_rss_anon_pages(pid)
    return total


# -- the device's life -----------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str  # the scans it ran
    snap: dict[str, Any]
    scans: list[tuple[str, int]] = field(default_factory=list)  # (kind, round)
    pages_scanned: int = 0


def run_emulator(gate: ReportGate, app_cgroup: str, deadline_s: int, timeout: float
                 ) -> list[tuple[str, dict[str, Any]]]:
    """resourced-emu.sh over the gate dir; returns (report label, snapshot) per report."""
    env = dict(os.environ, DEADLINE=str(deadline_s))
    proc = subprocess.Popen(["sh", EMU, gate.dir, app_cgroup], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    reports: list[tuple[str, dict[str, Any]]] = []
    end = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill)  # a stuck script cannot hang us
        timer.daemon = True
        timer.start()
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                print(f"          | {line}", flush=True)
                body = line.removeprefix("resourced-emu: ")
                label, sep, rest = body.partition(": ")
                if sep and rest.startswith("pages_sharing "):
                    if len(gate.snaps) <= len(reports):
                        raise DemoError(f"report {label!r} without a gate snapshot")
                    reports.append((label, gate.snaps[len(reports)]))
        finally:
            timer.cancel()
        rc = proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    if gate.error is not None:
        raise DemoError(f"report gate failed: {gate.error!r}")
    if rc != 0:
        raise DemoError(f"resourced-emu.sh exited with status {rc}")
    return reports


def extra_full_scan(mountpoint: str, timeout: float) -> dict[str, Any]:
    """`echo 2 > one_shot_scanning`, then wait for the scan to end and be counted."""
    before = int(read_attr(mountpoint, "full_scans"))
    path = os.path.join(mountpoint, "one_shot_scanning")

    def request() -> bool:
        try:
            with open(path, "w") as f:
                f.write("2\n")
            return True
        except OSError as e:
            if e.errno == errno.EINVAL:  # an earlier request still pending
                return False
            raise

    wait_until(request, timeout, 0.02, what="one_shot_scanning to accept 2")
    wait_until(lambda: read_attr(mountpoint, "one_shot_scanning") == "0\n"
               and int(read_attr(mountpoint, "full_scans")) > before, timeout, 0.02,
               what="the full scan to finish")
    return snapshot(mountpoint)


def build_steps(reports: list[tuple[str, dict[str, Any]]], extras: list[dict[str, Any]],
                start: dict[str, Any]) -> list[Step]:
    """Label each step with its scans and LKSM rounds (every scan is one crawl round)."""
    what = {"boot": "echo 8 > run: 3 initial full scans",
            "background": "freeze app + echo 1 > one_shot_scanning",
            "periodic": "echo 2 > one_shot_scanning (periodic)",
            "lowmem": "echo 2 > one_shot_scanning (low memory)",
            "foreground": "thaw app (no scan)"}
    kinds = {"boot": ["full"] * INITIAL_ROUND, "background": ["partial"], "periodic": ["full"],
             "lowmem": ["full"], "foreground": []}
    steps: list[Step] = []
    rnd = 0
    prev = start
    for label, snap in reports + [("full scan", s) for s in extras]:
        step = Step(label, what.get(label, "echo 2 > one_shot_scanning (extra)"), snap)
        for kind in kinds.get(label, ["full"]):
            rnd += 1
            step.scans.append((kind, rnd))
        step.pages_scanned = snap["pages_scanned"] - prev["pages_scanned"]
        prev = snap
        steps.append(step)
    return steps


def filter_state(step: Step) -> str:
    """A region is born in the crawl round current when its process joins: the joins are
    made while round 1 is prepared, before ksm_crawl_round++ (seed), so in round 0.  It
    filters once older than LKSM_REGION_MATURE rounds: from round MATURE_FROM on."""
    if not step.scans:
        return "-"
    mature = [r >= MATURE_FROM for _, r in step.scans]
    return "mature" if all(mature) else "learning" if not any(mature) else "mixed"


def mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / 2**20:.1f}"


def print_steps(steps: list[Step], app: str) -> None:
    print()
    print(f"Steps (background app: {app}; 'scanned' = pages_scanned delta of the step; "
          f"'sharing' = pages_sharing after it)")
    rows = []
    for s in steps:
        rounds = (f"{s.scans[0][1]}-{s.scans[-1][1]}" if len(s.scans) > 1
                  else str(s.scans[0][1]) if s.scans else "-")
        if s.scans and s.scans[0][0] == "partial":
            rounds += "p"
        rs = s.snap.get("region_share", {})
        rows.append([s.name, rounds, filter_state(s), s.pages_scanned, s.snap["pages_sharing"],
                     mib(s.snap["pages_sharing"]), s.snap["pages_shared"], s.snap["full_scans"],
                     *(rs.get(k, 0) for k in REGION_KEYS)])
    print_table(["step", "rounds", "filter", "scanned", "sharing", "MiB", "shared", "full",
                 "heap", "f_data", "f_bss", "confl"], rows, align="<<<")
    print("rounds: LKSM crawl rounds (p = partial scan); region_share columns are cumulative merges"
          " (stack:0 always, as in the seed)")


def per_full_scan(steps: list[Step], state: str) -> list[int]:
    """Pages scanned by single full-scan steps in the given filter state."""
    return [s.pages_scanned for s in steps
            if len(s.scans) == 1 and s.scans[0][0] == "full" and filter_state(s) == state]


# -- main ----------------------------------------------------------------------------------------


def pick_app(workload: Workload, wanted: str | None) -> str:
    if wanted is not None:
        workload.app(wanted)  # WorkloadError if unknown
        return wanted
    names = [a.name for a in workload.apps if a.count >= 1 and a.cpu_ms >= 100]
    if "youtube" in names:
        return "youtube"
    if not names:
        raise DemoError("the workload has no app to send to the background")
    return names[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, help="workload YAML (default: %(default)s)")
    p.add_argument("--app", default=None, help="app sent to the background (default: youtube, "
                   "else the first non-short app)")
    p.add_argument("--extra-scans", type=int, default=None,
                   help="full scans after the emulator (default 2, --quick 1); those "
                        f"from round {MATURE_FROM} on have mature filters")
    p.add_argument("--quick", action="store_true", help="fewer extra scans (for smoke tests)")
    p.add_argument("--pages-to-scan", type=int, default=2000, help="scanner batch (default 2000)")
    p.add_argument("--sleep-ms", type=int, default=0, help="scanner sleep_millisecs (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--timeout", type=float, default=90.0, help="deadline of each phase, s")
    args = p.parse_args(argv)
    if args.extra_scans is None:
        args.extra_scans = 1 if args.quick else 2
    return args


def demo(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    workload = load_workload(args.workload)
    app = pick_app(workload, args.app)
    tmp = tempfile.mkdtemp(prefix="lksmfs-demo-")
    stack.callback(shutil.rmtree, tmp, True)
    tag = f"lksmfs-demo-{os.getpid()}"

    say(f"spawning {os.path.relpath(args.workload, REPO)} as real processes ...")
    # a root named for this run: others may use lksmfs-workload at the same time
    procs = stack.enter_context(spawn_workload(workload, cgroup_root=cgroups.default_root(tag),
                                               lib_dir=os.path.join(tmp, "libs"),
                                               timeout=args.timeout))
    app_cg = os.path.join(procs.freezer.root, app)
    # if the emulator left the app frozen (an interrupted run): thawed, it can die
    stack.callback(cgroups.thaw_quietly, app_cg)
    pids = procs.pids()
    say(f"{len(pids)} processes in {procs.freezer.root} (cgroup v{procs.freezer.version}), "
        f"{rss_anon_pages(pids)} anonymous pages (RssAnon) in all")

    mp = os.path.join(tmp, "ksm")
    settings = {"pages_to_scan": args.pages_to_scan, "sleep_millisecs": args.sleep_ms,
                "scan_boost": max(100, min(10000, args.pages_to_scan))}
    say(f"mounting the daemon at {mp} (scope --cgroup {procs.freezer.root}) ...")
    daemon = stack.enter_context(mounted_daemon(mp, procs.freezer.root, settings,
                                                os.path.join(tmp, "daemon.log"), args.timeout))
    for line in daemon.log().splitlines():  # where the app's freeze will be seen from
        if "]: freezer: " in line:
            say(f"daemon: {line.split(']: ', 1)[1]}")
    start = snapshot(mp)

    gate = ReportGate(os.path.join(tmp, "emu"), mp)
    stack.callback(gate.close)
    say(f"scripts/resourced-emu.sh {gate.dir} {app_cg}")
    reports = run_emulator(gate, app_cg, int(args.timeout), timeout=4 * args.timeout)
    extras = []
    for i in range(args.extra_scans):
        say(f"extra full scan {i + 1}/{args.extra_scans}: echo 2 > one_shot_scanning")
        extras.append(extra_full_scan(mp, args.timeout))
    steps = build_steps(reports, extras, start)

    say("measuring the workload's own pages (engine in-process, filter off) ...")
    own = measure_workload_pages(procs)
    expected = model_expectation(workload, app)
    rss = rss_anon_pages(procs.pids())
    rss_scanned = rss_anon_pages(own["pids"])  # short tasks are never scanned

    print_steps(steps, app)
    final = steps[-1].snap
    learning = per_full_scan(steps, "learning")
    mature = per_full_scan(steps, "mature")
    print()
    if learning and mature:
        a, b = learning[-1], mature[-1]
        print(f"LKSM_FILTER: a full scan reads {a} pages while regions learn (rounds <= "
              f"{MATURE_FROM - 1}), {b} once they are mature: {100 * (a - b) / a:.1f}% less "
              f"work (heap, stack and unknown regions are never filtered)")
    print()
    print("Workload model vs measurement (pages_sharing = pages saved, 1 MiB = 256 pages)")
    kinds = ", ".join(f"{k} {s.pages_sharing}" for k, s in expected.by_kind.items())
    rows = [
        ("model: SimulatedSource.expected_sharing", expected.pages_sharing, expected.pages_shared,
         f"{kinds}, zero-filled {expected.zero.pages_sharing}; no kernel involved"),
        ("engine on the workload's own pages", own["pages_sharing"], own["pages_shared"],
         f"real memory of {own['slots']} processes, {own['pages_scanned']} pages; filter off"),
        ("daemon after the last step", final["pages_sharing"], final["pages_shared"],
         f"{rss_scanned} anon pages (Python runtime included); filter on, max_page_sharing 256"),
    ]
    for name, sharing, shared, note in rows:
        print(f"  {name:<41} {sharing:>7} pages {mib(sharing):>6} MiB  (shared {shared}): {note}")
    diff = final["pages_sharing"] - own["pages_sharing"]
    print(f"  The daemon's figure is {diff:+d} pages off the workload's own: every child is a Python "
          f"interpreter whose\n  runtime pages (about {rss_scanned - own['pages_scanned']} in the "
          f"{own['slots']} scanned processes) merge with each other and with the workload's zero "
          f"pages;\n  the model only knows the workload's pages.  Short tasks (< 100 ms CPU: "
          f"{len(pids) - own['slots']} here) are never scanned.")
    if own["pages_sharing"] != expected.pages_sharing or own["pages_shared"] != expected.pages_shared:
        print("  NOTE: the engine's figure for the workload's pages differs from the model's.")
    return {
        "workload": os.path.relpath(args.workload, REPO),
        "app": app,
        "processes": len(pids),
        "rss_anon_pages": rss,
        # per step: "scanned" is the pages_scanned delta, the rest the attributes after it
        "steps": [{"name": s.name, "scans": [list(x) for x in s.scans], "filter": filter_state(s),
                   "scanned": s.pages_scanned, **{k: v for k, v in s.snap.items() if k != "t"}}
                  for s in steps],
        "expected": {"pages_shared": expected.pages_shared,
                     "pages_sharing": expected.pages_sharing,
                     "pages_total": expected.pages_total, "zero_pages": expected.zero_pages},
        "workload_measured": own,
        "elapsed_s": time.monotonic() - T0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo.py: needs root (reads other processes' memory, cgroups, FUSE)", file=sys.stderr)
        return 2
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    cleaning = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if cleaning:
            print(f"\ndemo.py: {signal.Signals(signum).name} during cleanup: still cleaning up",
                  file=sys.stderr, flush=True)
            return
        raise Interrupted(signum)

    for s in signals:
        signal.signal(s, on_signal)
    status = 1
    stack = contextlib.ExitStack()
    try:
        summary = demo(args, stack)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        status = 0
    except Interrupted as e:
        print(f"\ndemo.py: {e} received: cleaning up", file=sys.stderr, flush=True)
        status = 128 + e.signum
    except (RuntimeError, WorkloadError, OSError) as e:  # DemoError, SpawnError too
        print(f"\ndemo.py: error: {e}", file=sys.stderr, flush=True)
    finally:
        cleaning = True
        stack.close()
    say(f"cleaned up (processes, cgroups, mount, temp dir); exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
