"""`lksmfs simulate`: the engine over a workload's timeline, deterministically.

The engine runs in one-shot mode (run=8) exactly as the daemon drives it, but on a
virtual clock (lksmfs.workload.driver, the one driver compare and the tests use too):
its initial full scans, then one step per timeline round.  A round applies that round's
events (exits reach the engine as the daemon's lifecycle watcher passes them on,
freeze/thaw hints as the freezer hook would), then performs the one_shot requests of
the round; a round with none gets the periodic full scan.

With `--policy ksm` it is mainline ksmd instead (lksmfs.engine.ksmd), over the apps
whose `ksm:` opt-in makes some of their memory mergeable: `run=1`, three passes (full
scans) at start, then `--passes` passes after each round's changes; the timeline's
freeze/thaw hints and one_shot requests have nothing to act on in mainline.

Every figure of every scan is the same on every run (simulated memory, virtual clock);
the wall time the scans took is the one thing that is not, so it is kept apart: in
`Simulation.wall_s`, and on stderr rather than stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lksmfs.commands.output.helptext import add_command
from lksmfs.commands.output.tables import print_table
from lksmfs.engine.params import LKSM_SCAN_FULL, POLICIES, POLICY_KSM, POLICY_LKSM
from lksmfs.sysfs.attrs import SettingError, parse_set


@dataclass
class Simulation:
    """One run: the deterministic figures of each scan, and apart from them the wall
    time each scan took (the same order)."""

    scans: list[dict[str, Any]]
    wall_s: list[float]


def simulate(
    workload_path: str, *, rounds: int | None = None, filter_enabled: bool = True,
    settings: Mapping[str, int | str] | None = None, policy: str = POLICY_LKSM, passes: int = 2,
) -> Simulation:
    """Run the workload; one record per scan the engine performed (a pass of ksmd's
    cursor under policy `ksm`, `passes` of them per round)."""
    from lksmfs.workload.driver import Driver
    from lksmfs.workload.simulated import SimulatedSource

    source = SimulatedSource.from_file(workload_path)
    try:
        d = Driver.create(source, policy=policy, filter_enabled=filter_enabled, settings=settings,
                          modelled_cpu=True)
        d.recording = True
        last = max((e.round for e in source.workload.timeline), default=0)
        d.start()  # run=8 and the initial rounds, or run=1 and ksmd's first passes
        for r in range(1, (rounds if rounds is not None else last) + 1):
            d.clock.now += 1.0
            eff = d.advance_round(r)  # exits, freezes and thaws reach the engine
            if policy == POLICY_KSM:
                for _ in range(passes):
                    d.full_scan()
                continue
            for mode in eff.one_shot or [LKSM_SCAN_FULL]:  # resourced's requests, else its periodic scan
                d.one_shot(mode)
    finally:
        source.close()
    return Simulation(d.scans, d.wall_s)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "simulate",
        help="run the engine over a workload file, deterministically",
        description="Play a workload's timeline (apps, their memory, freezes, one_shot requests) through "
                    "the engine on simulated memory and a virtual clock: one row per scan, the same on "
                    "every run. No process, no root needed.",
        examples="examples:\n"
               "  lksmfs simulate \"$(lksmfs share tizen-tv.yaml)\"\n"
               "  lksmfs simulate config/workloads/small.yaml --rounds 4 --no-filter --json\n\n"
               "stdout is the same on every run; the wall time the scans took goes to stderr.",
    )
    p.add_argument("workload", help="workload YAML (see config/workloads/)")
    p.add_argument("--rounds", type=int, default=None, help="timeline rounds to play (default: to its last event)")
    p.add_argument("--no-filter", action="store_true", help="disable LKSM_FILTER")
    p.add_argument("--policy", choices=POLICIES, default=POLICY_LKSM,
                   help="lksm (default): LKSM in one-shot mode; ksm: mainline ksmd over the apps whose "
                        "`ksm:` opt-in makes memory mergeable")
    p.add_argument("--passes", type=int, default=2, metavar="N",
                   help="policy ksm: ksmd passes (full scans) per round (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="initial attribute value")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per scan")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lksmfs.workload.schema import WorkloadError

    try:
        if args.passes < 1:
            raise SettingError(f"--passes: must be at least 1 (got {args.passes})")
        sim = simulate(
            args.workload, rounds=args.rounds, filter_enabled=not args.no_filter,
            settings=parse_set(args.set, args.policy), policy=args.policy, passes=args.passes,
        )
    except (WorkloadError, SettingError, OSError) as e:
        print(f"lksmfs simulate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(sim.scans))
    else:
        print_table(
            ("round", "mode", "slots", "scanned", "merged", "broken", "shared", "sharing", "unshared",
             "volatile", "region_share"),
            [(r["round"], r["mode"], r["slots_scanned"], r["scanned"], r["merged"], r["broken"],
              r["pages_shared"], r["pages_sharing"], r["pages_unshared"], r["pages_volatile"],
              " ".join(f"{k}:{v}" for k, v in r.get("region_share", {}).items())) for r in sim.scans],
            align=">>>>>>>>>><",
        )
    total = sum(sim.wall_s)
    print(f"wall time: {len(sim.wall_s)} scans in {total:.3f} s (slowest {max(sim.wall_s, default=0) * 1000:.1f} ms)",
          file=sys.stderr)
    return 0
