"""The daemon under process churn (issue 18): a real mount, both policies, while processes
in its scope are born, exec in place, start and lose dozens of threads, exit or are
killed at random moments and are reaped late (zombies for a while).

A driver (python -S, in a cgroup made for the test: the daemon's scope) forks the
churn.  Its own 64 equal pages make it a survivor that is scanned throughout.  While
the churn runs, the mount must answer every read and the daemon must stay alive; once
the driver has killed and reaped every child, two more full scans later only the driver
is left in the engine and the totals are its own: pages_shared + pages_sharing (the
mappings of KSM pages) equal its merging_pages - the dropped tasks' pages left the
totals.  The log holds no traceback, no dead thread and no task given up after an
"unexpected" error: every death was recognised as one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.mount import Mounts, read_attr, skip_unless_fuse, write_attr

pytestmark = pytest.mark.live

SCANS_DURING_CHURN = 3  # full scans the daemon completes while the churn goes on
CHURNED = 60  # children killed at random moments and reaped late meanwhile
MAX_CHILDREN = 12

# The driver: argv[1] a random seed, argv[2] a file where it keeps the number of children
# it reaped so far.  stdin "go" starts the churn, "stop" ends it; it prints "done" once
# every child is killed and reaped, then waits for stdin to close.
_DRIVER = r"""
import ctypes, mmap, os, random, select, signal, sys, threading, time
PR_SET_MEMORY_MERGE = 67
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)  # mainline: registered
def runtime():
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0])
def burn(ms):
    end = runtime() + ms * 1000000
    x = 0
    while runtime() < end:
        for i in range(20000):
            x ^= i
def pages(n, common):
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        m[i * 4096:(i + 1) * 4096] = bytes([common]) * 4096 if i % 2 else os.urandom(4096)
    return m
def spin(stop):
    x = 0
    for i in range(200000):
        x ^= i
def child(kind, rng):
    keep = pages(16, 0x33)
    burn(rng.choice([5, 60, 120]))
    if kind == "exec":  # in place: the same pid, a new mm
        os.execv(sys.executable, [sys.executable, "-S", "-c",
                 "import mmap, os, signal\n"
                 "m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
                 "m[:] = b'\\x44' * (8 * 4096)\n"
                 "x = 0\n"
                 "for i in range(3000000): x ^= i\n"
                 "os._exit(0) if os.urandom(1)[0] < 128 else signal.pause()\n"])
    if kind == "threads":  # dozens of threads come and go while it is scanned
        while True:
            ts = [threading.Thread(target=spin, args=(None,)) for _ in range(rng.randint(10, 40))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    if kind == "exits":
        os._exit(0)
    while True:
        signal.pause()
rng = random.Random(int(sys.argv[1]))
mine = pages(64, 0x5A)
for i in range(0, 64 * 4096, 4096):
    mine[i:i + 4096] = b"\x5a" * 4096
burn(150)
print("ready", flush=True)
sys.stdin.readline()
children = {}  # pid -> when it is reaped (None: not yet killed)
reaped = 0
while not select.select([sys.stdin], [], [], 0)[0]:  # until "stop"
    if len(children) < MAX_CHILDREN:
        kind = rng.choice(["plain", "threads", "exec", "exits"])
        seed = rng.random()
        pid = os.fork()
        if pid == 0:
            try:
                child(kind, random.Random(seed))
            finally:
                os._exit(1)
        children[pid] = None
    now = time.monotonic()
    for pid, reap_at in list(children.items()):
        if reap_at is None and rng.random() < 0.08:
            os.kill(pid, signal.SIGKILL)
            children[pid] = now + rng.uniform(0.0, 1.0)  # a zombie until then
        elif reap_at is not None and now >= reap_at:
            os.waitpid(pid, 0)
            del children[pid]
            reaped += 1
            with open(sys.argv[2] + ".new", "w") as f:
                f.write(str(reaped))
            os.rename(sys.argv[2] + ".new", sys.argv[2])
    time.sleep(0.02)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.read()
""".replace("MAX_CHILDREN", str(MAX_CHILDREN))


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    skip_unless_fuse()
    with Mounts() as m:
        yield m


def _answers(mp: Path) -> dict[str, int]:
    """The figures the test reads while the churn runs: each read must succeed."""
    return {name: int(read_attr(mp, name)) for name in ("pages_shared", "pages_sharing", "pages_unshared",
                                                           "full_scans")}


@pytest.mark.parametrize("policy", ["lksm", "ksm"])
def test_the_daemon_survives_churn_and_its_totals_follow(
    mounts: Mounts, v2_cgroup: Callable[[], str], policy: str, tmp_path: Path
) -> None:
    cg = v2_cgroup()
    progress = tmp_path / "reaped"
    driver = subprocess.Popen([sys.executable, "-S", "-c", _DRIVER, str(os.getpid()), str(progress)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        Path(cg, "cgroup.procs").write_text(f"{driver.pid}\n")  # before it forks anything
        assert driver.stdout is not None and driver.stdin is not None
        assert driver.stdout.readline() == "ready\n"
        # lksm: one-shot mode, a full scan requested whenever none is pending (periodic
        # full scans are a minute apart); ksm: ksmd's passes one after the other
        run = "8" if policy == "lksm" else "1"
        d = mounts.start("--policy", policy, "--cgroup", cg, "--no-freezer", "--set", f"run={run}",
                         "--set", "sleep_millisecs=10", "--set", "pages_to_scan=2000")
        mp = d.mountpoint

        def more_scans() -> None:
            if policy == "lksm" and read_attr(mp, "one_shot_scanning") == "0\n":
                write_attr(mp, "one_shot_scanning", b"2")  # EBUSY if one was just requested

        driver.stdin.write("go\n")
        driver.stdin.flush()
        start = int(read_attr(mp, "full_scans"))

        def churning() -> bool:
            """The mount answers and the daemon lives while the churn goes on, until
            CHURNED children were killed and reaped and the daemon completed
            SCANS_DURING_CHURN full scans."""
            got = _answers(mp)
            assert d.proc.poll() is None, d.log()
            assert driver.poll() is None
            more_scans()
            reaped = int(progress.read_text()) if progress.exists() else 0
            return got["full_scans"] >= start + SCANS_DURING_CHURN and reaped >= CHURNED

        wait_until(churning, 300, interval=0.05)
        driver.stdin.write("stop\n")
        driver.stdin.flush()
        assert driver.stdout.readline() == "done\n"
        # every child is gone: two full scans later, only the driver is left, and once the
        # engine is between two slots (the per-process files are a snapshot of a moment
        # and the totals of another) the totals are the driver's own
        after = int(read_attr(mp, "full_scans"))
        wait_until(lambda: int(read_attr(mp, "full_scans")) >= after + 2 or (more_scans(), False)[1], 120)

        def only_the_driver() -> tuple[list[str], int, int]:
            listed = sorted(os.listdir(mp / "proc"))
            mine = int(read_attr(mp / "proc" / str(driver.pid), "merging_pages"))
            return listed, mine, int(read_attr(mp, "pages_shared")) + int(read_attr(mp, "pages_sharing"))

        try:
            wait_until(lambda: (got := only_the_driver())[0] == [str(driver.pid)] and got[1] == got[2], 30)
        except TimeoutError:
            figures = {n: read_attr(mp, n).strip() for n in ("pages_shared", "pages_sharing", "pages_unshared",
                                                              "pages_volatile", "stable_node_chains",
                                                              "stable_node_dups", "full_scans")}
            pytest.fail(f"(processes listed, the driver's merging_pages, pages_shared + pages_sharing) stay "
                        f"{only_the_driver()}: not the driver's alone; {figures}")
        listed, mine, mappings = only_the_driver()
        assert mine >= 64  # its 64 equal pages
        if policy == "lksm":  # LKSM's file (mainline has none)
            assert read_attr(mp, "scanning_process") == "1\n"
        assert d.proc.poll() is None
        log = d.log()
        assert "Traceback" not in log and "CRITICAL" not in log and "thread died" not in log, log[-3000:]
        assert "unexpected error" not in log, log[-3000:]  # every death was told as one (ProcessGone)
        assert d.terminate() == 0
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(30)


