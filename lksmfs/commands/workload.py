"""`lksmfs workload spawn WORKLOAD.yaml`: real processes realising a workload file, kept
until SIGTERM/SIGINT (lksmfs.workload.spawn does the work)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from lksmfs.commands.output.helptext import add_command
from lksmfs.workload.schema import WorkloadError, load_workload
from lksmfs.workload.spawn import SpawnError, spawn_workload


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`lksmfs workload spawn WORKLOAD.yaml [--json] [--cgroup-root DIR] ...`"""
    p = add_command(
        subparsers, "spawn",
        help="start real processes realising a workload file",
        description="Start one process per workload instance, each in its own freezer cgroup "
                    "(ROOT/APP/K), print their pids and keep them until SIGTERM/SIGINT, then "
                    "kill them and remove the cgroups. ROOT is on the first cgroup2 mount of "
                    "/proc/self/mountinfo, else on the v1 freezer; stderr says where.",
        examples="examples:\n"
               "  lksmfs workload spawn \"$(lksmfs share small.yaml)\"            one pid per line\n"
               "  lksmfs workload spawn config/workloads/tizen-tv.yaml --json --round-interval 5\n"
               "  lksmfs workload spawn config/workloads/small.yaml --cgroup-root /sys/fs/cgroup/freezer/mine",
    )
    p.add_argument("workload", metavar="WORKLOAD.yaml")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {app, instance, pid, start_time, cgroup}")
    p.add_argument("--cgroup-root", metavar="DIR", default=None,
                   help="cgroup to create the groups under (default: lksmfs-workload on the first "
                        "cgroup2 mount, else on the v1 freezer)")
    p.add_argument("--lib-dir", metavar="DIR", default=None,
                   help="where to create the library files (default: a fresh temp dir)")
    p.add_argument("--round-interval", metavar="SECONDS", type=float, default=0.0,
                   help="advance one round every SECONDS, applying the timeline (0: never)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        workload = load_workload(args.workload)
    except WorkloadError as e:
        print(f"lksmfs workload spawn: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with spawn_workload(workload, cgroup_root=args.cgroup_root, lib_dir=args.lib_dir) as p:
            print(f"lksmfs workload spawn: {len(p.live())} processes, one cgroup each under {p.freezer.root} "
                  f"(cgroup {'v2' if p.freezer.v2 else 'v1 freezer'}: APP/K; removed at exit)",
                  file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps(p.describe()), flush=True)
            else:
                for rec in p.describe():
                    print(rec["pid"], flush=True)
            interval = args.round_interval
            next_round = time.monotonic() + interval
            while not stop.is_set():
                if interval > 0 and time.monotonic() >= next_round:
                    for ev in p.advance_round(p.round + 1).events:
                        print(f"round {p.round}: {ev.action} {ev.target or ev.mode}",
                              file=sys.stderr, flush=True)
                    next_round += interval
                if not p.live():
                    break
                stop.wait(min(0.5, interval) if interval > 0 else 0.5)
    except (SpawnError, OSError) as e:
        print(f"lksmfs workload spawn: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
