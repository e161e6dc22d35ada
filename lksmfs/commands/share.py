"""`lksmfs share [NAME]`: where the files the README uses are, wherever lksmfs is installed.

A `pip install` puts the example config, the workloads, `resourced-emu.sh`, the systemd
unit and the docs in the package (lksmfs/data).  In a clone, lksmfs/data holds symlinks
to the repository's own config/, docs/, systemd/, scripts/ and README.md (one copy of
each file; the wheel build copies the content), so the same command answers there with
the repository's paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lksmfs.commands.output.helptext import add_command

DATA = Path(__file__).resolve().parent.parent / "data"  # lksmfs/data


def shipped(root: Path = DATA) -> list[str]:
    """Every shipped file, as a path relative to `root` ('config/lksmfs.yaml', ...)."""
    out = []
    for directory, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            out.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(out)


def shipped_dirs(root: Path = DATA) -> list[str]:
    """Every directory under `root` that holds shipped files ('config', 'config/workloads', ...)."""
    return sorted({os.path.dirname(f) for f in shipped(root)} - {""})


def find(name: str, root: Path = DATA) -> list[str]:
    """Relative paths `name` may mean: itself, or every file/directory ending with it."""
    name = name.strip("/")
    candidates = shipped(root) + shipped_dirs(root)
    if name in candidates:
        return [name]
    return [c for c in candidates if c.endswith("/" + name)]


def locate(name: str, root: Path = DATA) -> Path:
    """The real path of the one shipped file or directory `name` means, else LookupError."""
    found = find(name, root)
    if len(found) == 1:
        return Path(os.path.realpath(root / found[0]))
    if not found:
        raise LookupError(f"no shipped file or directory {name!r}; shipped: {', '.join(shipped(root))}")
    raise LookupError(f"{name!r} is ambiguous: {', '.join(found)}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "share",
        help="print where the installed config, workloads, scripts, unit and docs are",
        description="Print the path of a file shipped with lksmfs (the example config, the workloads, "
        "resourced-emu.sh, the systemd unit, the docs), or of every one without NAME.",
        examples='examples:\n'
               '  lksmfs share                       every shipped file\n'
               '  install -m 0644 "$(lksmfs share lksmfs.service)" /etc/systemd/system/\n'
               '  lksmfs simulate "$(lksmfs share tizen-tv.yaml)"',
    )
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a file or directory: lksmfs.yaml, tizen-tv.yaml, workloads, docs, fuse.md, ...")
    p.set_defaults(func=run_share)
    return p


def run_share(args: argparse.Namespace) -> int:
    if args.name is None:
        for rel in shipped():
            print(os.path.realpath(DATA / rel))
        return 0
    try:
        print(locate(args.name))
    except LookupError as e:
        print(f"lksmfs share: {e.args[0]}", file=sys.stderr)
        return 1
    return 0
