"""The `lksmfs` command: one subcommand per job, each defined next to its code."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lksmfs import __version__
from lksmfs.commands.output.helptext import add_command

# subcommand modules: each has add_parser(subparsers) and sets `func` on its parser;
# a (group, module) pair nests the module's command under `lksmfs GROUP`
_COMMANDS: tuple[str | tuple[str, str], ...] = (
    "lksmfs.commands.simulate",
    "lksmfs.commands.compare",
    "lksmfs.commands.scan",
    "lksmfs.commands.mount",
    ("workload", "lksmfs.commands.workload"),
    "lksmfs.commands.share",
)
# the command word each entry adds (a group adds its own word): which module a command
# line needs, so that `lksmfs scan` imports the scan and not the FUSE daemon (start-up
# time is part of every answer `scan` gives)
_WORDS = {"simulate": 0, "compare": 1, "scan": 2, "mount": 3, "workload": 4, "share": 5}
_GROUPS = {
    "workload": ("workload commands: real processes that realise a workload file",
                 "Workload files (config/workloads/*.yaml; `lksmfs share workloads`) describe apps, their "
                 "memory and a timeline; `simulate` plays them without processes.",
                 "examples:\n  lksmfs workload spawn \"$(lksmfs share small.yaml)\" --json"),
}
EPILOG = """\
examples:
  lksmfs scan --pid 1234 --pid 5678     what LKSM would save on two processes
  lksmfs mount /run/lksm/ksm            the LKSM sysfs files (echo 8 > /run/lksm/ksm/run)
  lksmfs simulate "$(lksmfs share tizen-tv.yaml)"
  lksmfs COMMAND --help                 what a command does, with examples

Docs: README.md, docs/fuse.md (the mount), docs/spec.md (every file); `lksmfs share docs`.
"""
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _command_word(argv: list[str]) -> str | None:
    """The subcommand word of a command line (after the global options), if any."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--log-level":
            i += 2
            continue
        if a.startswith("-"):
            return None  # --help, --version, --log-level=X ...: every command is needed
        return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or, when `argv` names a command, a parser with just that one
    (the same parser for it: its help, its errors)."""
    word = _command_word(argv) if argv is not None else None
    only = _WORDS.get(word) if word is not None else None
    parser = argparse.ArgumentParser(
        prog="lksmfs",
        description="Lightweight KSM (LKSM) in user space: shadow-mode engine, /proc scanner, sysfs ABI on FUSE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lksmfs {__version__}")
    parser.add_argument("--log-level", dest="global_log_level", default="WARNING", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING (default), ERROR")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for n, entry in enumerate(_COMMANDS):
        if only is not None and n != only:
            continue
        group, name = entry if isinstance(entry, tuple) else (None, entry)
        sub = top
        if group is not None:
            if group not in groups:
                help_text, description, epilog = _GROUPS[group]
                g = add_command(top, group, help=help_text, description=description, examples=epilog)
                groups[group] = g.add_subparsers(dest=f"{group}_command", required=True, metavar="COMMAND")
            sub = groups[group]
        # every dependency is mandatory: a module that fails to import is a bug, said loudly
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lksmfs.system.memtune import tune_allocator

    # numpy's OpenBLAS starts a pool of worker threads at import; nothing here does linear
    # algebra, so they would only idle in `ps -L` as unnamed "lksmfs" threads
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        tune_allocator()
        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        logging.basicConfig(level=getattr(logging, str(args.global_log_level).upper(), logging.WARNING),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling: one line, no traceback
        print("lksmfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
