"""Every subcommand's parser made the same way: a description wrapped like argparse
wraps it, then examples kept exactly as written (argparse would re-flow them)."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

WIDTH = 88


def add_command(subparsers: Any, name: str, *, help: str, description: str, examples: str
                ) -> argparse.ArgumentParser:
    """`lksmfs ... NAME`: `help` for the parent's list, `description` (one paragraph,
    wrapped here) and `examples` (an 'examples:' block, and notes, verbatim) for --help."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=textwrap.fill(" ".join(description.split()), WIDTH),
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser
