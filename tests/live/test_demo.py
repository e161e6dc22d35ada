"""`make run` in small: scripts/demo.py over config/workloads/small.yaml, real everything.

Expected figures are worked out by hand from small.yaml and the LKSM rules (see each
assertion); none is copied from the demo's output.  small.yaml's non-short instances
(widget runs 50 ms < 100 ms: skipped) and their workload pages:

    viewer/0, viewer/1: libfoo .data 4 + .bss 2, libbar .data 2 + .bss 1, heap 8, stack 2 = 19
    player/0:           libfoo .data 4 + .bss 2, heap 4, stack 2, gpu 4                   = 16

Sharing (pages_sharing = copies beyond the first, per content):
    libfoo .data: 2 shared offsets x 3 processes -> 4;   libbar .data: 2 offsets x 2 -> 2
    libfoo .bss:  1 shared offset x 3 -> 2;              libbar .bss: 1 offset x 2 -> 1
    heap pool pages 0,1 in all 3 -> 4; pages 2,3 in the 2 viewers -> 2
    zero-filled: libfoo .data 1 x 3 + libfoo .bss 1 x 3 + viewer heap 2 x 2 = 10 -> 9
    total 24; KSM pages (pages_shared): 2 + 2 + 1 + 1 + 4 + 1 (zero) = 11
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from testkit import REPO
from testkit.mount import mounted_at, skip_unless_fuse

pytestmark = pytest.mark.live

DEMO = [sys.executable, str(REPO / "scripts" / "demo.py"),
        "--workload", str(REPO / "config" / "workloads" / "small.yaml")]
WORKLOAD_PAGES = 19 + 19 + 16
EXPECTED_SHARING, EXPECTED_SHARED = 24, 11


def test_demo_small_quick(tmp_path: Path) -> None:
    skip_unless_fuse()
    out = tmp_path / "summary.json"
    run = subprocess.run([*DEMO, "--quick", "--json", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=40)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Workload model vs measurement" in run.stdout
    assert "resourced-emu: done" in run.stdout  # the emulator ran to its end
    s = json.loads(out.read_text())
    steps = {st["name"]: st for st in s["steps"]}
    names = [st["name"] for st in s["steps"]]
    assert names == ["boot", "background", "periodic", "lowmem", "foreground", "full scan"]

    # partial scans never count as full scans; 3 initial rounds, then one per full step
    assert [st["full_scans"] for st in s["steps"]] == [3, 3, 4, 5, 5, 6]
    # every scan is one crawl round; regions are born in round 0 and mature after 5
    assert [[r for _, r in st["scans"]] for st in s["steps"]] == [[1, 2, 3], [4], [5], [6], [],
                                                                   [7]]
    assert steps["background"]["scans"] == [["partial", 4]]
    assert [st["filter"] for st in s["steps"]] == ["learning"] * 3 + ["mature", "-", "mature"]

    # the model and the engine on the workload's own pages: both the hand-worked figure
    assert s["processes"] == 4
    assert (s["expected"]["pages_sharing"], s["expected"]["pages_shared"]) == (EXPECTED_SHARING,
                                                                               EXPECTED_SHARED)
    own = s["workload_measured"]
    assert (own["pages_sharing"], own["pages_shared"]) == (EXPECTED_SHARING, EXPECTED_SHARED)
    assert own["slots"] == 3 and own["pages_scanned"] == WORKLOAD_PAGES

    # pages scanned: the memory is still, so each unfiltered full scan reads every present
    # anonymous page of the 3 processes (the workload's and their interpreters')
    full = steps["periodic"]["scanned"]
    assert WORKLOAD_PAGES < full <= s["rss_anon_pages"]
    assert steps["boot"]["scanned"] == 3 * full
    # the partial scan reads the frozen viewers whole, and nobody else (faults unchanged)
    assert 2 * 19 <= steps["background"]["scanned"] < full
    assert steps["foreground"]["scanned"] == 0
    # mature filters: libfoo .data's unique offset never merged, so each of the 3 running
    # processes skips at least that page
    assert steps["full scan"]["scanned"] <= full - 3

    # merges only accumulate; the daemon sees the workload's merges plus the runtime's
    sharing = [st["pages_sharing"] for st in s["steps"]]
    assert sharing == sorted(sharing) and sharing[-1] >= EXPECTED_SHARING
    rs = steps["boot"]["region_share"]
    assert rs["heap"] >= 14  # viewer 4 pool + 2 zero each, player 2 pool pages
    # .data 2x3 + 1x3 + 2x2 = 13, .bss 1x3 + 1x3 + 1x2 = 8 (a .bss region that real ASLR
    # makes change size twice counts as conflicted)
    assert rs["file_data"] + rs["file_bss"] + rs["conflicted"] >= 13 + 8
    assert rs["stack"] == 0


def _cmdline_pids(needle: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_demo_sigterm_cleans_up() -> None:
    """SIGTERM in the middle of the device's life, an app frozen: exit 128+15, nothing left
    behind (processes, cgroups, mount, temp dir)."""
    skip_unless_fuse()
    proc = subprocess.Popen([*DEMO, "--extra-scans", "3"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(40, proc.kill)
    timer.start()
    lines: list[str] = []
    cgroup = mountpoint = ""
    workers: list[int] = []
    daemon: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " processes in " in line:
                cgroup = line.split(" processes in ")[1].split()[0]
            if "mounting the daemon at " in line:
                mountpoint = line.split("mounting the daemon at ")[1].split()[0]
            if "resourced-emu: background:" in line:  # the app's cgroup is frozen now
                workers = [int(p) for d, _, fs in os.walk(cgroup) if "cgroup.procs" in fs
                           for p in Path(d, "cgroup.procs").read_text().split()]
                daemon = _cmdline_pids(mountpoint)
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=40)
        lines.append(rest)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert workers and daemon, text  # the run got as far as the background report
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "SIGTERM received: cleaning up" in text
    assert not os.path.exists(cgroup)
    assert not mounted_at(mountpoint) and not os.path.exists(os.path.dirname(mountpoint))
    for pid in workers + daemon:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} survived"
