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
            "print('lksmfs.daemon' in sys.modules, 'lksmfs.commands.scan' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


# The modules a command that does not scan must not load: numpy and the engine cost about
# 110 ms of start-up (issue 17), and `lksmfs --help` or `lksmfs share` need neither.
_HEAVY = ("numpy", "lksmfs.engine.ksm", "lksmfs.sources.procfs", "lksmfs.workload.simulated")
_LOADED = (
    "import sys\n"
    "from lksmfs import cli\n"
    "try:\n"
    "    cli.main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('LOADED', *[m for m in {_HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
)


def _loaded_after(*argv: str) -> list[str]:
    """The heavy modules loaded once `lksmfs ARGV` has been dispatched, in a fresh interpreter."""
    err = subprocess.run([sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True,
                         check=True, stdin=subprocess.DEVNULL).stderr
    line = next(x for x in err.splitlines() if x.startswith("LOADED"))
    return line.split()[1:]


def test_commands_that_do_not_scan_import_neither_numpy_nor_the_engine() -> None:
    for argv in (["--help"], ["--version"], ["share"], ["share", "small.yaml"], ["mount", "--help"],
                 ["scan", "--help"], ["simulate", "--help"], ["compare", "--help"],
                 ["workload", "spawn", "--help"], ["scan", "--rounds", "x"]):
        assert _loaded_after(*argv) == [], argv


def test_the_heavy_module_names_are_the_ones_a_run_loads() -> None:
    """The check above is not vacuous: running the engine loads every one of them."""
    code = ("import sys, lksmfs.engine\n"
            "assert 'numpy' not in sys.modules\n"
            "import lksmfs.engine.ksm\n"  # the package loads nothing; the engine does
            "assert 'numpy' in sys.modules\n"
            "import lksmfs.sources.procfs, lksmfs.workload.simulated\n"
            f"print(*[m for m in {_HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == list(_HEAVY)
