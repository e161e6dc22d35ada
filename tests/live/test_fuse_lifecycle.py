"""Daemon life: signals, stale mounts, sd_notify, and a resourced-like client on a real cgroup."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from lksmfs.system import cgroups
from lksmfs.system.waiting import wait_until
from testkit import REPO
from testkit.memproc import MemProcess
from testkit.mount import Mounts, mounted_at, read_attr, sh

pytestmark = pytest.mark.live


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_0(mounts: Mounts, child: MemProcess, sig: int) -> None:
    d = mounts.start("--pid", str(child.pid), "--set", "run=1", "--set", "sleep_millisecs=0")
    wait_until(lambda: int(read_attr(d.mountpoint, "pages_scanned")) > 0, 20)
    d.proc.send_signal(sig)
    assert d.proc.wait(20) == 0, d.log()
    assert not mounted_at(d.mountpoint)
    assert "Traceback" not in d.log()


def test_stale_mount_is_cleared_at_start(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid))
    d.proc.kill()
    d.proc.wait(10)
    assert mounted_at(d.mountpoint)  # the kernel keeps a dead FUSE mount
    with pytest.raises(OSError) as ei:
        os.listdir(d.mountpoint)  # stat may come from the attribute cache for a second
    assert ei.value.errno == errno.ENOTCONN
    again = mounts.start("--pid", str(child.pid), "--set", "pages_to_scan=777")
    r = sh("cat pages_to_scan", cwd=again.mountpoint)
    assert (r.returncode, r.stdout) == (0, "777\n")
    assert "stale mount" in again.log()
    assert again.terminate() == 0
    assert not mounted_at(again.mountpoint)


def test_sd_notify_ready_watchdog_stopping(mounts: Mounts, child: MemProcess) -> None:
    name = f"lksmfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)  # an abstract socket, as systemd may hand out ("@...")
        s.settimeout(20)
        d = mounts.start(
            "--pid", str(child.pid),
            env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000"},
            wait=False,
        )
        first = s.recv(4096).decode()
        assert "READY=1" in first.splitlines()
        # READY comes after the FUSE handshake: the files are there right now
        assert read_attr(d.mountpoint, "run") == "0\n"
        pets = 0
        while pets < 3:  # every WATCHDOG_USEC/2 = 0.1 s
            assert s.recv(4096).decode() == "WATCHDOG=1"
            pets += 1
        d.proc.send_signal(signal.SIGTERM)
        seen = []
        while "STOPPING=1" not in seen:
            seen.append(s.recv(4096).decode())
        assert d.proc.wait(20) == 0


@pytest.fixture
def app_cgroup(child: MemProcess, v1_freezer_cgroup: Callable[[], str]) -> Path:
    """The child alone in a fresh v1 freezer group (thawed, emptied, removed at the end)."""
    cg = Path(v1_freezer_cgroup())
    cgroups.attach(str(cg), child.pid)
    return cg


def test_resourced_emulator_with_dash(mounts: Mounts, child: MemProcess, app_cgroup: Path) -> None:
    """The client only echoes and cats.  Its app is the child (64 identical pages)."""
    d = mounts.start("--pid", str(child.pid), "--set", "pages_to_scan=2000")
    env = dict(os.environ, DEADLINE="30")
    r = subprocess.run(
        ["dash", str(REPO / "scripts/resourced-emu.sh"), str(d.mountpoint), str(app_cgroup)],
        capture_output=True, text=True, timeout=200, env=env, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr + d.log()
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    steps = [m.group(1) for line in lines if (m := re.match(r"resourced-emu: (\w+): pages", line))]
    assert steps == ["boot", "background", "periodic", "lowmem", "foreground"]
    last = next(line for line in lines if line.startswith("resourced-emu: lowmem:"))
    pages = int(re.search(r"\((\d+) pages\)", last).group(1))  # type: ignore[union-attr]
    assert pages >= 63  # a group of 64 identical pages shares 63 of them
    assert re.search(r"region_share heap:\d+ stack:0 file_data:\d+", last)
    assert lines[-1] == "resourced-emu: done"
    assert read_attr(d.mountpoint, "run") == "8\n"
    assert (app_cgroup / "freezer.state").read_text().strip() == "THAWED"
    log = d.log()
    assert f"freezer hint: {child.pid}@" in log and "frozen" in log, log


def test_resourced_emulator_misses_a_deadline(mounts: Mounts, child: MemProcess) -> None:
    """With pages_to_scan 1 and sleep 10 s the boot scans cannot finish in 2 s: exit 1."""
    d = mounts.start(
        "--pid", str(child.pid), "--set", "pages_to_scan=1", "--set", "sleep_millisecs=10000"
    )
    env = dict(os.environ, DEADLINE="2")
    r = subprocess.run(
        ["dash", str(REPO / "scripts/resourced-emu.sh"), str(d.mountpoint)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert r.returncode == 1
    assert "deadline (2 s) missed: boot" in r.stderr
