"""`lksmfs scan`: run the engine on real processes in the foreground and report.

The quickest answer to "what would LKSM save on these processes right now?": the
initial full scans LKSM does when it starts (3 by default), then the counters.  With
`--policy ksm` the same question for mainline ksmd: that many passes over the processes
that asked for KSM (madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE)).

A result explains itself: every process in scope that was not scanned is listed with
why (no such process or cgroup, a short task with its CPU time, no permission to read
its memory), and when nothing in scope could be scanned the command fails (status 1)
instead of reporting "0 processes, 0.0 MiB saved".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lksmfs.commands.output.helptext import add_command
from lksmfs.commands.output.progress import Progress
from lksmfs.commands.output.summary import describe_scan, mib, saved_pages
from lksmfs.engine.params import INITIAL_ROUND, KSM_SHORT_TASK_TIME_MS, POLICIES, POLICY_LKSM
from lksmfs.sources.scope import Scope
from lksmfs.sysfs.attrs import AttributeTable, SettingError, apply_settings, parse_set
from lksmfs.system import privilege
from lksmfs.system.proc import PROC_ROOT, AccessDenied, ProcessGone, TaskId, read_comm

if TYPE_CHECKING:  # the engine (and numpy) are imported when a scan runs, not for --help
    from lksmfs.engine.ksm import Ksm
    from lksmfs.engine.stats import Skipped
    from lksmfs.sources.base import MemorySource

EXIT_NOTHING_SCANNED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
LIST_AT_MOST = 10  # skipped processes listed one by one in the text output; more are counted

EXAMPLES = """\
examples:
  lksmfs scan --pid 1234 --pid 5678          # what LKSM would save on these two processes
  lksmfs scan --cgroup /sys/fs/cgroup/app --set use_zero_pages=1 --json
  lksmfs scan                                # every user process (as root)
  lksmfs scan --policy ksm --pid 1234        # mainline ksmd's passes instead (madvised/prctl'd memory)

Processes with less than 100 ms of CPU time are left out, as LKSM's check_short_task()
does (--include-short-tasks scans them too). Everything left out is listed on stderr
with why (in --json: "skipped"). Exit status: 0 when something in scope was scanned,
1 when nothing could be, 2 on a bad option, 130 on Ctrl-C.
"""


@dataclass
class ScanRun:
    """One `lksmfs scan`: the engine and how far it got (the progress line reads it)."""

    ksm: Ksm
    rounds: int
    round: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def status(self) -> str:
        """'scanning: round 2/3, process 5/12, 31204 pages, 3 s' (read without a lock)."""
        st = self.ksm.stats
        started = st.lksm_nr_scanned_slot
        total = started + len(self.ksm.mm.scan_list)  # 0 between two scans
        where = f", process {started}/{total}" if total else ""
        return (f"scanning: round {self.round}/{self.rounds}{where}, {st.pages_scanned} pages, "
                f"{time.perf_counter() - self.t0:.0f} s")


def skipped_record(task: TaskId, why: Skipped, short_task_ms: int, proc_root: str) -> dict[str, Any]:
    """The engine's reason for leaving `task` out, as `--json` prints it."""
    from lksmfs.engine.crawler import SKIP_DENIED, SKIP_SHORT
    from lksmfs.engine.ksmd import SKIP_NOT_MERGEABLE

    comm = why.comm or read_comm(task.pid, proc_root)
    if why.reason == SKIP_NOT_MERGEABLE:
        return {"pid": task.pid, "comm": comm, "reason": SKIP_NOT_MERGEABLE,
                "message": "asked for no KSM (no madvise(MADV_MERGEABLE) mapping, no prctl(PR_SET_MEMORY_MERGE)): "
                           "mainline ksmd (--policy ksm) scans only what asked"}
    if why.reason == SKIP_SHORT:
        cpu_ms = why.runtime_ns // 1_000_000
        return {"pid": task.pid, "comm": comm, "reason": SKIP_SHORT, "cpu_ms": cpu_ms,
                "message": f"short task: {cpu_ms} ms of CPU time, less than the {short_task_ms} ms LKSM "
                           f"requires (check_short_task); --include-short-tasks scans it"}
    lacking = privilege.missing(privilege.READ_CAPS)
    because = (f"({privilege.who()} without {' and '.join(lacking)}): needs root or CAP_SYS_PTRACE" if lacking else
               "even with root's capabilities (the process has more privileges than this one, or a security "
               "module refuses)")
    return {"pid": task.pid, "comm": comm, "reason": SKIP_DENIED,
            "message": f"permission denied reading its memory {because}"}


def scan_processes(
    pids: list[int] | None = None,
    *,
    cgroups: list[str] | None = None,
    exclude_comms: list[str] | None = None,
    rounds: int = INITIAL_ROUND,
    settings: Mapping[str, int | str] | None = None,
    filter_enabled: bool = True,
    include_short_tasks: bool = False,
    progress: bool | None = None,
    proc_root: str = PROC_ROOT,
    policy: str = POLICY_LKSM,
) -> dict[str, Any]:
    """Run `rounds` full scans over the processes in scope and return the attribute
    values plus `wall_s` (time spent in the scans), `scans` (one entry per scan),
    `scanned_processes` and `skipped` (what was left out, and why).  `settings` are
    initial attribute values (SettingError if one is refused).  `progress`: a status
    line on stderr after a second (None: when stderr is a terminal).  `policy` `ksm`
    runs mainline ksmd's passes (full scans) instead of LKSM's."""
    from lksmfs.engine.ksm import Ksm
    from lksmfs.sources.procfs import ProcfsSource

    scope = Scope(pids=set(pids or ()), cgroups=list(cgroups or ()), exclude_comms=set(exclude_comms or ()))
    skipped: list[dict[str, Any]] = [
        {"pid": u.pid, "comm": u.comm, "reason": u.reason, "message": u.message}
        | ({"cgroup": u.cgroup} if u.cgroup is not None else {})
        for u in scope.unmatched(proc_root, os.getpid())
    ]
    short_ms = 0 if include_short_tasks else KSM_SHORT_TASK_TIME_MS
    with ProcfsSource(proc_root, scope=scope) as source:
        ksm = Ksm(source, filter_enabled=filter_enabled, self_pid=source.self_pid, short_task_ms=short_ms,
                  policy=policy)
        table = AttributeTable(ksm)
        apply_settings(table, settings or {})
        run = ScanRun(ksm, rounds)
        scans = []
        scanned: set[TaskId] = set()
        with Progress(run.status, enabled=progress):
            for i in range(1, rounds + 1):
                run.round = i
                rec: dict[str, Any] = dict(ksm.full_scan())
                rec["counters"] = ksm.counters()
                scans.append(rec)
                scanned.update(ksm.slots)
        out: dict[str, Any] = dict(table.values())
        out["wall_s"] = time.perf_counter() - run.t0
        out["scans"] = scans
        out["tasks_exited"] = ksm.counters()["tasks_exited"]
        out["tasks_denied"] = ksm.counters()["tasks_denied"]
        out["tasks_failed"] = ksm.counters()["tasks_failed"]
        out["scanned_processes"] = len(scanned - set(ksm.skipped))
        out["thp_pages"] = huge_pages(source, scanned - set(ksm.skipped))
        out["skipped"] = skipped + [skipped_record(t, why, short_ms, proc_root)
                                    for t, why in sorted(ksm.skipped.items(), key=lambda kv: kv[0].pid)]
        return out


def huge_pages(source: MemorySource, tasks: set[TaskId]) -> int:
    """Pages of these tasks' mergeable VMAs in transparent huge pages (smaps'
    AnonHugePages, as mapped: shadow mode splits none), where KSM's split of a huge page
    before a merge changes what merges (lksmfs.engine.thp)."""
    total = 0
    for task in tasks:
        try:
            total += sum(m.huge_pages for m in source.mappings(task) if m.mergeable)
        except (ProcessGone, AccessDenied):
            continue
    return total


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "scan",
        help="scan real processes in the foreground and print what LKSM would save",
        description="Run LKSM's initial full scans (3) over real processes, read-only through /proc, "
                    "and print the counters an LKSM kernel would show: pages_sharing is the memory saved.",
        examples=EXAMPLES,
    )
    p.add_argument("--pid", type=int, action="append", default=[], help="scan this pid (repeatable)")
    p.add_argument("--cgroup", action="append", default=[], metavar="DIR",
                   help="scan the processes of this cgroup directory and below (repeatable)")
    p.add_argument("--exclude-comm", action="append", default=[], metavar="COMM",
                   help="leave out processes with this comm (repeatable)")
    p.add_argument("--rounds", type=int, default=INITIAL_ROUND, help="full scans to run (default: 3)")
    p.add_argument("--no-filter", action="store_true", help="disable LKSM_FILTER")
    p.add_argument("--policy", choices=POLICIES, default=POLICY_LKSM,
                   help="lksm (default): LKSM's full scans; ksm: mainline ksmd's passes over the processes "
                        "that madvised or prctl'd KSM")
    p.add_argument("--include-short-tasks", action="store_true",
                   help=f"also scan tasks with less than {KSM_SHORT_TASK_TIME_MS} ms of CPU time "
                        "(LKSM skips them: check_short_task)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="initial attribute value, checked like a write to the file (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print(f"lksmfs scan: --rounds: must be at least 1 (got {args.rounds})", file=sys.stderr)
        return EXIT_USAGE
    t0 = time.perf_counter()
    try:
        settings = parse_set(args.set, args.policy)
        out = scan_processes(
            args.pid,
            cgroups=args.cgroup,
            exclude_comms=args.exclude_comm,
            rounds=args.rounds,
            settings=settings,
            filter_enabled=not args.no_filter,
            include_short_tasks=args.include_short_tasks,
            policy=args.policy,
        )
    except SettingError as e:
        print(f"lksmfs scan: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lksmfs scan: interrupted after {time.perf_counter() - t0:.1f} s: no result", file=sys.stderr)
        return EXIT_INTERRUPTED
    status = 0 if out["scanned_processes"] else EXIT_NOTHING_SCANNED
    if args.json:
        out["scans"] = [{k: v for k, v in s.items() if k != "counters"} for s in out["scans"]]
        print(json.dumps(out))
    elif out["scanned_processes"]:
        print_summary(out, args.rounds)
    print_skipped(out["skipped"], nothing_scanned=status != 0)
    return status


def print_summary(out: Mapping[str, Any], rounds: int) -> None:
    """The text result on stdout: one line per scan, then the counters."""
    for i, s in enumerate(out["scans"], 1):
        print(f"{i}/{rounds} {describe_scan(s, s['counters'])}")
    zero = f"  ksm_zero_pages {out['ksm_zero_pages']}" if out["use_zero_pages"] else ""
    print(f"pages_shared {out['pages_shared']}  pages_sharing {out['pages_sharing']}{zero} "
          f"({mib(saved_pages(out))} saved)")
    if out["use_zero_pages"]:
        print(f"general_profit {out['general_profit']} bytes ({out['general_profit'] / 2**20:.1f} MiB: "
              f"the pages saved less 64 bytes per rmap item)")
    print(f"pages_unshared {out['pages_unshared']}  pages_volatile {out['pages_volatile']}")
    if out.get("thp_pages"):
        print(f"thp_pages {out['thp_pages']}  (in transparent huge pages: a merge splits one first, "
              "and its zero-filled pages become the shared zero page)")
    if "pages_skipped" in out:  # policy ksm: mainline's smart_scan
        print(f"pages_scanned {out['pages_scanned']}  pages_skipped {out['pages_skipped']}"
              f"  (smart_scan {out['smart_scan']})")
    if "region_share" in out:
        print("region_share " + " ".join(f"{k}:{v}" for k, v in out["region_share"].items()))
    print(f"processes: {out['scanned_processes']} scanned, {len(out['skipped'])} left out; "
          f"wall {out['wall_s']:.3f} s")


def print_skipped(skipped: list[Mapping[str, Any]], *, nothing_scanned: bool) -> None:
    """What was left out and why, on stderr: one line each, or counts by reason when
    there are many (every user process, say); then the failure, if nothing was scanned."""
    err = sys.stderr
    if len(skipped) <= LIST_AT_MOST:
        for s in skipped:
            print(f"lksmfs scan: left out {_what(s)}: {s['message']}", file=err)
    else:
        by_reason: dict[str, list[Mapping[str, Any]]] = {}
        for s in skipped:
            by_reason.setdefault(s["reason"], []).append(s)
        for reason, items in by_reason.items():
            n = f"{len(items)} process" + ("es" if len(items) > 1 else "")
            print(f"lksmfs scan: left out {n} ({reason}), e.g. {_what(items[0])}: "
                  f"{items[0]['message']}", file=err)
        print("lksmfs scan: --json lists every process left out", file=err)
    if nothing_scanned:
        print("lksmfs scan: nothing in scope could be scanned" + (": see above" if skipped else
              " (no process in scope)"), file=err)


def _what(s: Mapping[str, Any]) -> str:
    """'pid 4242 (sleep)' or 'cgroup DIR'."""
    if s.get("cgroup"):
        return f"cgroup {s['cgroup']}"
    return f"pid {s['pid']}" + (f" ({s['comm']})" if s.get("comm") else "")
