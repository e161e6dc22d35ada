"""`lksmfs scan`: run the engine on real processes in the foreground and report.

The quickest answer to "what would LKSM save on these processes right now?": the
initial full scans LKSM does when it starts (3 by default), then the counters.  With
`--policy ksm` the same question for mainline ksmd: that many passes over the processes
that asked for KSM (madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE)).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import INITIAL_ROUND, POLICIES, POLICY_KSM, POLICY_LKSM
from lksmfs.sources.base import PAGE_SIZE
from lksmfs.sysfs.attrs import AttributeTable, SettingError, apply_settings, parse_set
from lksmfs.system.proc import PROC_ROOT


def scan_processes(
    pids: list[int] | None = None,
    *,
    cgroups: list[str] | None = None,
    exclude_comms: list[str] | None = None,
    rounds: int = INITIAL_ROUND,
    settings: Mapping[str, int | str] | None = None,
    filter_enabled: bool = True,
    proc_root: str = PROC_ROOT,
    policy: str = POLICY_LKSM,
) -> dict[str, Any]:
    """Run `rounds` full scans over the processes in scope and return the attribute
    values plus `wall_s` (time spent in the scans) and `scans` (one entry per scan).
    `settings` are initial attribute values (SettingError if one is refused); `policy`
    `ksm` runs mainline ksmd's passes instead of LKSM's scans."""
    from lksmfs.sources.procfs import ProcfsSource
    from lksmfs.sources.scope import Scope

    scope = Scope(pids=set(pids or ()), cgroups=list(cgroups or ()), exclude_comms=set(exclude_comms or ()))
    with ProcfsSource(proc_root, scope=scope) as source:
        ksm = Ksm(source, filter_enabled=filter_enabled, self_pid=source.self_pid, policy=policy)
        table = AttributeTable(ksm)
        apply_settings(table, settings or {})
        scans = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            rec = ksm.full_scan()
            c = ksm.counters()
            rec.update(pages_shared=c["pages_shared"], pages_sharing=c["pages_sharing"],
                       pages_unshared=c["pages_unshared"], pages_volatile=c["pages_volatile"],
                       pages_skipped=c["pages_skipped"])
            scans.append(rec)
        wall = time.perf_counter() - t0
        out: dict[str, Any] = dict(table.values())
        out["wall_s"] = wall
        out["scans"] = scans
        out["tasks_exited"] = ksm.counters()["tasks_exited"]
        out["tasks_denied"] = ksm.counters()["tasks_denied"]
        return out


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scan", help="scan real processes in the foreground and print the counters")
    p.add_argument("--pid", type=int, action="append", default=[], help="scan this pid (repeatable)")
    p.add_argument("--cgroup", action="append", default=[], help="scan the processes of this cgroup dir")
    p.add_argument("--exclude-comm", action="append", default=[], help="leave out processes with this comm")
    p.add_argument("--rounds", type=int, default=INITIAL_ROUND, help="full scans to run (default: 3)")
    p.add_argument("--no-filter", action="store_true", help="disable LKSM_FILTER")
    p.add_argument("--policy", choices=POLICIES, default=POLICY_LKSM,
                   help="lksm (default): LKSM's full scans; ksm: mainline ksmd's passes over "
                        "the processes that madvised or prctl'd KSM")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="initial attribute value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = parse_set(args.set, args.policy)
        out = scan_processes(
            args.pid,
            cgroups=args.cgroup,
            exclude_comms=args.exclude_comm,
            rounds=args.rounds,
            settings=settings,
            filter_enabled=not args.no_filter,
            policy=args.policy,
        )
    except SettingError as e:
        print(f"lksmfs scan: {e}", file=sys.stderr)
        return 2
    if args.json:
        out.pop("scans")
        print(json.dumps(out))
        return 0
    for i, s in enumerate(out["scans"], 1):
        print(
            f"scan {i}: {s['slots_scanned']} processes, {s['pages_scanned']} pages, "
            f"{s['merged']} merged, {s['broken']} broken, {s['wall_s']:.3f} s"
        )
    mib = out["pages_sharing"] * PAGE_SIZE / 2**20
    print(f"pages_shared {out['pages_shared']}  pages_sharing {out['pages_sharing']} ({mib:.1f} MiB saved)")
    print(f"pages_unshared {out['pages_unshared']}  pages_volatile {out['pages_volatile']}")
    if args.policy == POLICY_KSM:
        print(f"pages_scanned {out['pages_scanned']}  pages_skipped {out['pages_skipped']}"
              f"  (smart_scan {out['smart_scan']})")
    if "region_share" in out:
        print("region_share " + " ".join(f"{k}:{v}" for k, v in out["region_share"].items()))
    print(f"wall {out['wall_s']:.3f} s")
    return 0
