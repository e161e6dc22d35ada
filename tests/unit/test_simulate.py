"""`lksmfs simulate` is deterministic: two runs print the same stdout, byte for byte;
the wall time of the scans, the one figure that is not, goes to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = str(Path(__file__).resolve().parents[2] / "config" / "workloads" / "small.yaml")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # separate interpreters: a different hash seed each, as two runs of the command have
    return subprocess.run([sys.executable, "-m", "lksmfs.cli", "simulate", SMALL, *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.parametrize("args", [(), ("--json",), ("--no-filter", "--rounds", "8")])
def test_two_runs_print_the_same(args: tuple[str, ...]) -> None:
    first, second = _run(*args), _run(*args)
    assert first.stdout == second.stdout
    assert len(first.stdout) > 500 and "wall" not in first.stdout  # nine scans printed
    assert first.stderr.startswith("wall time: ") and "wall time: " in second.stderr


def test_json_records_hold_no_wall_time() -> None:
    scans = json.loads(_run("--json").stdout)
    assert len(scans) == 9  # 3 initial rounds, then one scan per round 1..6 (small.yaml)
    assert all("wall_s" not in s for s in scans)
    assert [s["round"] for s in scans] == [0, 0, 0, 1, 2, 3, 4, 5, 6]
