"""`lksmfs COMMAND` builds only COMMAND's parser (start-up time), and it is the same one."""

from __future__ import annotations

import argparse
import subprocess
import sys

from lksmfs import cli


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_each_command_word_names_the_module_that_registers_it() -> None:
    everything = _choices(cli.build_parser())
    assert sorted(everything) == sorted(cli._WORDS)
    for word in everything:
        assert _choices(cli.build_parser([word])) == [word]


def test_global_options_before_the_command_and_help_need_every_command() -> None:
    assert cli._command_word(["--log-level", "INFO", "scan", "--pid", "1"]) == "scan"
    assert cli._command_word(["--help"]) is None
    assert cli._command_word([]) is None
    assert len(_choices(cli.build_parser(["--version"]))) == len(cli._WORDS)


def test_scan_does_not_import_the_daemon() -> None:
    code = ("import sys; from lksmfs import cli; cli.build_parser(['scan'])\n"
            "print('lksmfs.daemon' in sys.modules, 'lksmfs.scan' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
