"""The `lksmfs` command: one subcommand per job, each defined next to its code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand modules: each has add_parser(subparsers) and sets `func` on its parser;
# a (group, module) pair nests the module's command under `lksmfs GROUP`
_COMMANDS: tuple[str | tuple[str, str], ...] = (
    "lksmfs.simulate",
    "lksmfs.compare",
    "lksmfs.scan",
    "lksmfs.daemon",
    ("workload", "lksmfs.workload.spawn"),
    "lksmfs.share",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lksmfs",
        description="Lightweight KSM (LKSM) in user space: shadow-mode engine, /proc scanner, sysfs ABI on FUSE.",
    )
    parser.add_argument("--log-level", dest="global_log_level", default="WARNING", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING (default), ERROR")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for entry in _COMMANDS:
        group, name = entry if isinstance(entry, tuple) else (None, entry)
        sub = top
        if group is not None:
            if group not in groups:
                g = top.add_parser(group, help=f"{group} commands")
                groups[group] = g.add_subparsers(dest=f"{group}_command", required=True)
            sub = groups[group]
        # every dependency is mandatory: a module that fails to import is a bug, said loudly
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lksmfs.memtune import tune_allocator

    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.global_log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
