"""SIGQUIT is a clean stop, and a mountpoint the daemon had to create is said so."""

from __future__ import annotations

import signal

import pytest

from lksmfs.system.waiting import wait_until
from testkit.memproc import MemProcess
from testkit.mount import Daemon, Mounts, mounted_at, read_attr

pytestmark = pytest.mark.live


def test_sigquit_stops_cleanly_and_a_created_mountpoint_is_logged(mounts: Mounts, child: MemProcess) -> None:
    mp = mounts.root / "new-ksm"  # does not exist (the test's log goes beside it)
    d = Daemon(mp, ["--pid", str(child.pid), "--set", "run=1", "--set", "sleep_millisecs=0"])
    mounts.daemons.append(d)
    d.wait_mounted()
    assert f"mountpoint {mp} did not exist: created it (mkdir -p)" in d.log()
    wait_until(lambda: int(read_attr(mp, "pages_scanned")) > 0, 20)  # threads busy
    d.proc.send_signal(signal.SIGQUIT)
    assert d.proc.wait(20) == 0, d.log()
    assert not mounted_at(mp)
    log = d.log()
    assert "SIGQUIT: stopping as for SIGTERM" in log and f"unmounted {mp}, stopping" in log
    assert "Traceback" not in log and "core dumped" not in log


def test_an_existing_mountpoint_is_not_reported_as_created(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid))
    assert "did not exist" not in d.log()
