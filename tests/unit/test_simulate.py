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


TWINS = """seed: 1
apps:
  - {name: twin, count: 2, heap: {pages: 6, share: 1.0}, stack: {pages: 1}, ksm: prctl}
  - {name: loner, heap: {pages: 6, share: 1.0}}
timeline:
  - {round: 1, exit: twin/1}
  - {round: 2, one_shot: 2}
"""


def test_policy_ksm_runs_mainline_passes(tmp_path: Path) -> None:
    """Two prctl'd twins (6 equal heap pages, a unique stack page each) and an app that
    asked for nothing: mainline scans 14 pages a pass; pass 1 takes checksums, pass 2
    merges 6 pairs; after twin/1 exits, 7 pages are left: its twin's 6 are still KSM
    pages (shared, by nobody else), its stack page waits in the unstable tree."""
    w = tmp_path / "twins.yaml"
    w.write_text(TWINS)
    r = subprocess.run([sys.executable, "-m", "lksmfs.cli", "simulate", str(w), "--policy", "ksm", "--passes", "2",
                        "--json"], capture_output=True, text=True, timeout=120, check=True)
    scans = json.loads(r.stdout)
    assert [(s["round"], s["scanned"], s["pages_shared"], s["pages_sharing"], s["pages_unshared"],
             s["pages_volatile"]) for s in scans] == [
        (0, 14, 0, 0, 0, 14), (0, 14, 6, 6, 2, 0), (0, 14, 6, 6, 2, 0),  # three passes at start
        # twin/1 gone with its mappings; smart_scan (on by default) skips the stack page
        # that never merges at its 5th and 7th visit (visits 4 and 6 are scanned)
        (1, 7, 6, 0, 1, 0), (1, 6, 6, 0, 0, 1),
        (2, 7, 6, 0, 1, 0), (2, 6, 6, 0, 0, 1),  # one_shot: nothing to act on in mainline
    ]
    assert all("region_share" not in s and s["smart_scan"] == 1 for s in scans)
    bad = subprocess.run([sys.executable, "-m", "lksmfs.cli", "simulate", str(w), "--policy", "ksm",
                          "--set", "run=8"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert bad.stderr == "lksmfs simulate: --set run=8: must be an integer 0..2 (0 stop, 1 merge, 2 unmerge) (got 8)\n"
