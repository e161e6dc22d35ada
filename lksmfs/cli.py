"""The `lksmfs` command: one subcommand per job, each defined next to its code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand modules: each has add_parser(subparsers) and sets `func` on its parser
_COMMANDS = ("lksmfs.simulate", "lksmfs.scan", "lksmfs.daemon", "lksmfs.workload.spawn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lksmfs",
        description="Lightweight KSM (LKSM) in user space: shadow-mode engine, /proc scanner, sysfs ABI on FUSE.",
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # a subcommand whose optional dependency is missing
            logging.getLogger("lksmfs").debug("subcommand %s unavailable: %s", name, e)
            continue
        add = getattr(module, "add_parser", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
