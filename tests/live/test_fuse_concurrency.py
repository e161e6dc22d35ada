"""20 concurrent `cat` readers while the scanner runs flat out: nothing lost, nothing torn."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.memproc import filled
from testkit.mount import Mounts, read_attr, sh

pytestmark = pytest.mark.live

NUM = re.compile(r"\d+\n")
FORMATS = {
    "pages_sharing": NUM,
    "pages_shared": NUM,
    "pages_unshared": NUM,
    "pages_volatile": NUM,
    "pages_scanned": NUM,
    "full_scans": NUM,
    "general_profit": re.compile(r"-?\d+\n"),
    "run": re.compile(r"1\n"),
    "pages_to_scan": re.compile(r"10000\n"),
    "region_share": re.compile(r"heap:\d+ stack:\d+ file_data:\d+ file_bss:\d+ conflicted:\d+\n"),
}
READERS = 20
WINDOW_S = 3.0


def reader(mp: Path, names: list[str], stop: float, out: list[str], bad: list[str]) -> None:
    """One `cat` per file per loop; full_scans and pages_scanned must never go back."""
    last = {"full_scans": -1, "pages_scanned": -1}
    while time.monotonic() < stop:
        r = subprocess.run(["cat", *names], cwd=mp, capture_output=True, text=True, check=False)
        if r.returncode != 0 or r.stderr:
            bad.append(f"cat failed: {r.returncode} {r.stderr!r}")
            return
        lines = r.stdout.splitlines(keepends=True)
        if len(lines) != len(names):
            bad.append(f"lost/extra lines: {r.stdout!r}")
            return
        for name, text in zip(names, lines, strict=True):
            if not FORMATS[name].fullmatch(text):
                bad.append(f"{name}: torn or malformed {text!r}")
            if name in last:
                value = int(text)
                if value < last[name]:
                    bad.append(f"{name} went back: {last[name]} -> {value}")
                last[name] = value
        out.append(r.stdout)


def test_twenty_readers_during_full_speed_scan(mounts: Mounts) -> None:
    with filled(12000, 0x11) as a, filled(12000, 0x22) as b:
        d = mounts.start(
            "--pid", str(a.pid), "--pid", str(b.pid),
            "--set", "pages_to_scan=10000", "--set", "sleep_millisecs=0", "--set", "run=1",
        )
        mp = d.mountpoint
        wait_until(lambda: int(read_attr(mp, "pages_scanned")) > 0, 20)
        scanned_before = int(read_attr(mp, "pages_scanned"))
        names = list(FORMATS)
        stop = time.monotonic() + WINDOW_S
        results: list[list[str]] = [[] for _ in range(READERS)]
        bad: list[str] = []
        threads = [
            threading.Thread(target=reader, args=(mp, names[i % 3:] + names[: i % 3], stop,
                                                  results[i], bad))
            for i in range(READERS)
        ]
        # each reader reads the files in its own rotated order
        for t in threads:
            t.start()
        # a write must get in between scanner batches while all this goes on: counted in
        # batches the scanner ran meanwhile (10000 pages each), not in seconds
        r = sh("cat pages_scanned; echo 10000 > pages_to_scan; cat pages_scanned", cwd=mp)
        for t in threads:
            t.join(WINDOW_S + 30)
        assert not bad, bad[:5]
        assert (r.returncode, r.stderr) == (0, "")
        before, after = map(int, r.stdout.split())
        assert after - before <= 5 * 10000, (before, after)  # not starved behind batch after batch
        assert all(len(res) >= 5 for res in results), [len(res) for res in results]
        scanned_after = int(read_attr(mp, "pages_scanned"))
        # the scanner really ran flat out during the window (24000 pages per full scan)
        assert scanned_after - scanned_before >= 10000, (scanned_before, scanned_after)
        assert d.proc.poll() is None
