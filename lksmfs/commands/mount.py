"""`lksmfs mount MOUNTPOINT`: the daemon in the foreground (lksmfs.daemon.service),
configured from a YAML file and the command line.  `python -m lksmfs.daemon` is the
same command without the CLI (main() below)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from lksmfs.commands.output.helptext import add_command
from lksmfs.config import (
    Config,
    ConfigError,
    check_log_level,
    check_metrics_textfile,
    check_policy,
    check_source,
    load_config,
    recheck_tunables,
)
from lksmfs.daemon.service import SWITCH_INTERVAL_S, Daemon
from lksmfs.sysfs.attrs import SettingError, parse_set
from lksmfs.system import privilege

MOUNT_EXAMPLES = """\
examples:
  lksmfs mount /run/lksm/ksm &                    every user process, config defaults
  echo 8 > /run/lksm/ksm/run                      one-shot mode: 3 initial full scans
  echo 1 > /run/lksm/ksm/one_shot_scanning        a partial scan (frozen tasks, newcomers)
  cat /run/lksm/ksm/pages_sharing /run/lksm/ksm/region_share
  lksmfs mount /run/lksm/ksm --cgroup /sys/fs/cgroup/apps --set run=1 --log-level INFO

Frozen-task hints come from every cgroup v1 freezer and cgroup2 hierarchy in
/proc/self/mountinfo (the log says which at start). Exit status: 0 after a clean stop,
1 on a runtime failure (no privilege, mount refused, an engine thread died), 2 on a
bad option or configuration.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`lksmfs mount MOUNTPOINT ...`"""
    p = add_command(
        subparsers, "mount",
        help="run the daemon: the LKSM sysfs ABI at MOUNTPOINT",
        description="Run LKSM in shadow mode over real processes and serve its sysfs files "
                    "(/sys/kernel/mm/ksm of an LKSM kernel) at MOUNTPOINT, in the foreground, until "
                    "SIGTERM/SIGINT/SIGQUIT. Needs root (or CAP_SYS_ADMIN, CAP_SYS_PTRACE, "
                    "CAP_DAC_READ_SEARCH). docs/fuse.md describes the mount.",
        examples=MOUNT_EXAMPLES,
    )
    _add_arguments(p)
    p.set_defaults(func=run_mount)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--config", metavar="FILE", help="YAML config (see config/lksmfs.yaml)")
    p.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                   help="scan only these processes (repeatable)")
    p.add_argument("--cgroup", action="append", default=[], metavar="DIR",
                   help="scan only tasks of this cgroup directory (repeatable)")
    p.add_argument("--exclude-comm", action="append", default=[], metavar="COMM",
                   help="never scan processes with this comm (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="initial attribute value, checked like a write (repeatable)")
    p.add_argument("--policy", metavar="lksm|ksm",
                   help="lksm: LKSM's ABI and crawler (default); ksm: mainline ksmd and its files")
    p.add_argument("--source", metavar="procfs|simulated:WORKLOAD.yaml")
    p.add_argument("--no-filter", action="store_true", help="disable LKSM_FILTER")
    p.add_argument("--no-freezer", action="store_true", help="no hints from the cgroup freezer")
    p.add_argument("--log-level", metavar="LEVEL")
    p.add_argument("--metrics-textfile", metavar="FILE",
                   help="write the figures for node_exporter's textfile collector (FILE.prom)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file, then the command line on top."""
    cfg = load_config(args.config)
    if args.pid:
        if any(p <= 0 for p in args.pid):
            raise ConfigError(f"--pid: must be positive (got {args.pid})")
        cfg.scope.pids = list(args.pid)
    if args.cgroup:
        cfg.scope.cgroups = list(args.cgroup)
    if args.exclude_comm:
        cfg.scope.exclude_comms = list(args.exclude_comm)
    if getattr(args, "policy", None):
        cfg.policy = check_policy(args.policy, "--policy")
        recheck_tunables(cfg)
    for name, value in parse_set(args.set, cfg.policy).items():
        setattr(cfg.tunables, name, value)
    if args.source:
        cfg.source = check_source(args.source, "--source")
    if args.no_filter:
        cfg.filter = False
    if getattr(args, "no_freezer", False):
        cfg.freezer.enabled = False
    if args.log_level:
        cfg.log_level = check_log_level(args.log_level, "--log-level")
    if getattr(args, "metrics_textfile", None):
        cfg.metrics_textfile = check_metrics_textfile(args.metrics_textfile, "--metrics-textfile")
    return cfg


def unprivileged_mount_error() -> str | None:
    """Why this process cannot mount, said before libfuse tries (and prints its own
    "fuse: failed to open /dev/fuse: Permission denied"); None when it can."""
    lacking = privilege.missing(privilege.MOUNT_CAPS)
    if not lacking:
        return None
    return (f"needs root: running as {privilege.who()} without {' and '.join(lacking)}. Mounting needs "
            f"CAP_SYS_ADMIN, reading other processes' memory CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: run it "
            f"as root, or with the capabilities systemd/lksmfs.service grants "
            f"({' '.join(privilege.UNIT_CAPS)})")


def run_mount(args: argparse.Namespace) -> int:
    """Entry point of `lksmfs mount`."""
    try:
        cfg = config_from_args(args)
    except SettingError as e:  # ConfigError too
        print(f"lksmfs mount: {e}", file=sys.stderr)
        return 2
    why = unprivileged_mount_error()
    if why is not None:
        print(f"lksmfs mount: {why}", file=sys.stderr)
        return 1
    logging.basicConfig(  # force: the daemon's level comes from its config, not the CLI's
        level=cfg.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(threadName)s]: %(message)s",
        force=True,
    )
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        daemon = Daemon(cfg, args.mountpoint)
    except SettingError as e:
        print(f"lksmfs mount: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lksmfs mount: {e}", file=sys.stderr)
        return 1
    try:
        return daemon.run()
    except OSError as e:
        print(f"lksmfs mount: {args.mountpoint}: {e}", file=sys.stderr)
        daemon.stop_threads()
        return 1
    except RuntimeError as e:  # fuse_main failed (mount refused): libfuse said why above
        print(f"lksmfs mount: {args.mountpoint}: libfuse could not mount it (status {e})", file=sys.stderr)
        daemon.stop_threads()
        return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m lksmfs.daemon MOUNTPOINT ...`: the mount command without the CLI."""
    p = argparse.ArgumentParser(prog="lksmfs-mount")
    _add_arguments(p)
    return run_mount(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
