"""No request wedges the daemon: the sequences of issue 8, through a real mount (root).

Each test mounts a daemon in one-shot mode over real children, lets the 3 initial
rounds finish, then plays one sequence with real `bash` echoes and checks that every
accepted `one_shot_scanning` request reads 0 again within a deadline and that the next
request is accepted - the state a wedged daemon could never reach again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lksmfs.system.proc import pids, try_stat
from lksmfs.system.waiting import wait_until
from testkit.memproc import MemProcess, filled
from testkit.mount import Mounts, read_attr, sh, skip_unless_fuse

pytestmark = pytest.mark.live

DEADLINE = 30.0


@pytest.fixture
def mounts() -> Mounts:
    skip_unless_fuse()
    with Mounts() as m:
        yield m


def booted(mounts: Mounts, *children: MemProcess, scope: bool = True) -> Path:
    """A daemon at run=8 (over `children` only, when `scope`), initial rounds done."""
    args = [a for c in children for a in ("--pid", str(c.pid))] if scope else []
    mp = mounts.start(*args, "--set", "run=8", "--no-freezer").mountpoint
    wait_until(lambda: read_attr(mp, "full_scans") == "3\n", DEADLINE)
    wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
    return mp


def completes(mp: Path, mode: int) -> None:
    """`echo MODE > one_shot_scanning` is accepted and the request ends."""
    r = sh(f"echo {mode} > one_shot_scanning", cwd=mp, shell="bash")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE,
               what=f"request {mode} to end (one_shot_scanning back to 0)")


def hint(mp: Path, text: str) -> tuple[int, str]:
    r = sh(f"echo '{text}' > hint", cwd=mp, shell="bash")
    return r.returncode, r.stderr


def kthread_pid() -> int:
    """Some kernel thread (kthreadd is pid 2 on Linux, but look, do not assume)."""
    for pid in pids():
        st = try_stat(pid)
        if st is not None and st.kthread:
            return pid
    pytest.skip("no kernel thread visible in /proc")


def test_hints_for_unscannable_tasks_are_refused_and_requests_still_complete(mounts: Mounts) -> None:
    with filled(8) as inside, filled(8) as outside:
        mp = booted(mounts, inside)
        daemon_pid = mounts.daemons[-1].proc.pid
        refused = {
            f"{outside.pid} frozen": "Invalid argument",  # alive, but not in --pid
            "1 frozen": "Invalid argument",  # pid 1 is outside --pid too
            f"{daemon_pid} frozen": "Invalid argument",  # the daemon itself
            f"{kthread_pid()} frozen": "Invalid argument",  # no memory to scan
            "4194303 frozen": "No such process",
        }
        for text, message in refused.items():
            rc, err = hint(mp, text)
            assert rc != 0 and message in err, (text, rc, err)
            completes(mp, 1)
        completes(mp, 2)
        assert read_attr(mp, "full_scans") == "4\n"
        assert read_attr(mp, "scanning_process") == "1\n"


def test_frozen_task_that_exits_before_its_scan(mounts: Mounts) -> None:
    """The hinted task exits before the crawler prepares (its join fails) or while it is
    queued (the scan finds the queue empty): either way the request ends."""
    with filled(16) as a, filled(16) as b, filled(16) as c:
        mp = booted(mounts, a, b, c)
        assert hint(mp, f"{b.pid} frozen")[0] == 0
        assert sh(f"echo 1 > one_shot_scanning; kill -9 {b.pid}", cwd=mp, shell="bash").returncode == 0
        b.close()
        wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
        assert hint(mp, f"{c.pid} frozen")[0] == 0
        c.close()  # gone before the request
        completes(mp, 1)
        completes(mp, 2)
        wait_until(lambda: read_attr(mp, "scanning_process") == "1\n", DEADLINE)


def test_unmerge_with_a_frozen_slot_queued_then_partial_request(mounts: Mounts) -> None:
    """run=2 while a frozen slot waits for its scan, then run=8 and a partial request:
    the request completes, and it scans the frozen slot, and only it."""
    with filled(32, 0x41) as a, filled(32, 0x41) as b:
        mp = booted(mounts, a, b)
        assert int(read_attr(mp, "pages_sharing")) >= 2 * 32 - 1
        assert hint(mp, f"{b.pid} frozen")[0] == 0
        assert sh("echo 2 > run", cwd=mp, shell="bash").returncode == 0
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"):
            assert read_attr(mp, name) == "0\n", name
        assert read_attr(mp, "scanning_process") == "2\n"  # slots stay registered
        assert sh("echo 8 > run", cwd=mp, shell="bash").returncode == 0
        completes(mp, 1)
        assert sh(f"cat proc/{a.pid}/rmap_items", cwd=mp).stdout == "0\n"
        # b was scanned as a frozen slot (no checksum gate): its 32 identical pages are
        # one KSM page and 31 sharing mappings, at least
        assert int(sh(f"cat proc/{b.pid}/merging_pages", cwd=mp).stdout) >= 31
        completes(mp, 2)
        assert int(sh(f"cat proc/{a.pid}/rmap_items", cwd=mp).stdout) > 0


def test_run_0_in_the_middle_of_a_scan_then_run_8(mounts: Mounts) -> None:
    """The scan is wrapped up and counted; the request stays pending and completes once
    run is 8 again."""
    with filled(4096) as a, filled(4096) as b:
        mp = booted(mounts, a, b)
        for name, value in (("pages_to_scan", 1), ("sleep_millisecs", 50)):
            assert sh(f"echo {value} > {name}", cwd=mp).returncode == 0
        scanned = int(read_attr(mp, "pages_scanned"))
        assert sh("echo 2 > one_shot_scanning", cwd=mp).returncode == 0
        # 1 page every 50 ms over more than 8192 pages: surely still running after 5
        wait_until(lambda: int(read_attr(mp, "pages_scanned")) > scanned + 5, DEADLINE)
        assert sh("echo 0 > run", cwd=mp).returncode == 0
        wait_until(lambda: read_attr(mp, "full_scans") == "4\n", DEADLINE)
        assert read_attr(mp, "one_shot_scanning") == "2\n"
        assert sh("echo 1000 > pages_to_scan; echo 0 > sleep_millisecs; echo 8 > run", cwd=mp).returncode == 0
        wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
        assert read_attr(mp, "full_scans") == "5\n"
        completes(mp, 1)
