"""The seed's process lifecycle on real processes (issue 20, points 2.1-2.4).

First the lifecycle watcher alone (lksmfs.daemon.lifecycle) on real children: an exit is told
while the child is still a zombie, by pidfd and by /proc polling alike, and an exec is
told as the old mm's exit.  Then through a real mount, with real `echo`s: what
scanning_process and the page counters show at an exit (a zombie's), an exec, a
madvise, and a one_shot_scanning write after run 8 -> 0.  The rules and the seed
functions they come from are in tests/unit/test_engine_lifecycle.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lksmfs.daemon.lifecycle import LifecycleWatcher, pidfd_supported
from lksmfs.system import cgroups
from lksmfs.system.proc import TaskId, ksm_registered, runtime_ns, state, task_id
from lksmfs.system.waiting import wait_until
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import filled
from testkit.mount import Mounts, read_attr, sh, skip_unless_fuse

pytestmark = pytest.mark.live

DEADLINE = 30.0
TOLD = 10.0  # an exit, exec or madvise is told within this (the watcher polls every 0.5 s)

# burns 150 ms of CPU (not a short task), maps 32 pages of 0x5a, then execs a new Python
# (sum_exec_runtime carries over) that maps 16 pages of 0x33
EXECER = r"""
import os, sys, time
t = time.thread_time()
while time.thread_time() - t < 0.15:
    pass
buf = bytearray(b"\x5a" * (4096 * 32))
print("ready", flush=True)
sys.stdin.readline()
new = "import sys\nbuf = bytearray(b'\\x33' * (4096 * 16))\nprint('execd', flush=True)\nsys.stdin.readline()\n"
os.execv(sys.executable, [sys.executable, "-S", "-c", new])
"""

# a short task (no CPU burnt): 16 pages of 0x77 in their own mapping, madvise(MADV_MERGEABLE)d
# on the first line read
MADVISER = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
n = 16
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.write(b"\x77" * (n * 4096))
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("ready", flush=True)
sys.stdin.readline()
print("done" if libc.madvise(addr, n * 4096, 12) == 0 else f"error {ctypes.get_errno()}", flush=True)
sys.stdin.readline()
"""


class Child:
    """A `python -S -c SCRIPT` child driven line by line; killed and reaped at the end."""

    def __init__(self, script: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, line: str = "") -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


# -- the watcher alone --------------------------------------------------------------------


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "polling"])
def test_watcher_tells_an_exit_while_the_child_is_a_zombie(use_pidfd: bool) -> None:
    """exit_mm() runs before the parent reaps: the exit is told with the child not yet
    reaped (we never wait() for it until the end)."""
    if use_pidfd and not pidfd_supported():
        pytest.skip("no pidfd_open here")
    p = subprocess.Popen(["sleep", "300"])
    try:
        task = wait_until(lambda: _task(p.pid), 10)
        told: list[tuple[TaskId, str]] = []
        done = threading.Event()

        def on_exit(t: TaskId) -> None:
            told.append((t, state(t.pid)))
            done.set()

        w = LifecycleWatcher(watched=lambda: [task], on_exit=on_exit, poll_interval=0.2, use_pidfd=use_pidfd)
        w.start()
        try:
            wait_until(lambda: w.running, 5)
            p.send_signal(signal.SIGKILL)
            assert done.wait(TOLD), "exit not told"
            # told once, before the reap: a zombie, or still on its way there (past
            # exit_mm(), which is when the kernel calls ksm_exit())
            assert len(told) == 1 and told[0][0] == task and told[0][1] in ("Z", "R", "D", "X")
            # ... and not reaped: it becomes (or already is) a zombie, never leaves /proc
            # (a SIGKILLed task can still be "R" while it runs do_exit() past exit_mm())
            wait_until(lambda: state(p.pid) == "Z", TOLD, what="the child a zombie, not reaped")
        finally:
            w.stop()
    finally:
        p.kill()
        p.wait()


def test_watcher_tells_an_exec_as_the_old_mms_exit(children: list[Child]) -> None:
    c = Child(EXECER)
    children.append(c)
    old = task_id(c.pid)
    told: list[TaskId] = []
    w = LifecycleWatcher(watched=lambda: [old], on_exit=told.append, poll_interval=0.2)
    w.start()
    try:
        assert c.send() == "execd"
        wait_until(lambda: told, TOLD, what="the exec told as an exit")
        new = task_id(c.pid)
        assert told == [old]
        assert new == old and new.image != old.image and not old.same_image(new)  # the same task, a new mm
    finally:
        w.stop()


def _task(pid: int) -> TaskId | None:
    try:
        return task_id(pid)
    except Exception:  # noqa: BLE001 - not there yet
        return None


# -- through the mount ----------------------------------------------------------------------


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    skip_unless_fuse()
    with Mounts() as m:
        yield m


def boot(mounts: Mounts, *args: str) -> Path:
    """A daemon at run=8 over `args`' scope, its 3 initial rounds done."""
    mp = mounts.start(*args, "--set", "run=8", "--no-freezer").mountpoint
    wait_until(lambda: read_attr(mp, "full_scans") == "3\n", DEADLINE)
    wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
    return mp


def echo(mp: Path, text: str, name: str) -> None:
    r = sh(f"echo {text} > {name}", cwd=mp, shell="bash")
    assert r.returncode == 0, r.stderr


def counters(mp: Path) -> dict[str, int]:
    return {n: int(read_attr(mp, n)) for n in ("pages_shared", "pages_sharing", "pages_unshared",
                                               "pages_volatile", "nr_regions")}


def ksm_stat(mp: Path, pid: int) -> dict[str, str]:
    lines = (mp / "proc" / str(pid) / "ksm_stat").read_text().splitlines()
    return dict(ln.split(None, 1) for ln in lines if " " in ln)


def test_exit_of_a_zombie_drops_scanning_process_at_once_and_its_pages_at_the_scans_end(mounts: Mounts) -> None:
    """__ksm_exit(): scanning_process 2 -> 1 while b is still an unreaped zombie, with no
    scan in between (one-shot mode, idle) and every page counter as it was; the next
    full scan's lksm_flush_removed_mm_list() frees b's items: its 64 pages of 0x5a
    mapped a's KSM page, which keeps a's 64 mappings, so pages_sharing drops by 64 at
    least (more if b shared runtime pages too)."""
    with filled(64) as a, filled(64) as b:
        mp = boot(mounts, "--pid", str(a.pid), "--pid", str(b.pid))
        assert read_attr(mp, "scanning_process") == "2\n"
        before = counters(mp)
        assert before["pages_sharing"] >= 127
        os.kill(b.pid, signal.SIGKILL)  # not reaped: MemProcess waits only in close()
        wait_until(lambda: read_attr(mp, "scanning_process") == "1\n", TOLD, what="scanning_process 1")
        # still there, a zombie: told at exit_mm, not at the reap (a SIGKILLed task can
        # still be "R" in do_exit() past exit_mm() when it is told)
        wait_until(lambda: state(b.pid) == "Z", TOLD, what="b a zombie, not reaped")
        assert counters(mp) == before and read_attr(mp, "full_scans") == "3\n"
        b.close()
        echo(mp, 2, "one_shot_scanning")
        wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
        after = counters(mp)
        assert read_attr(mp, "full_scans") == "4\n" and read_attr(mp, "scanning_process") == "1\n"
        assert after["pages_sharing"] <= before["pages_sharing"] - 64
        assert after["pages_shared"] >= 1  # a's pages still on their KSM page
        assert after["nr_regions"] == before["nr_regions"]  # never decremented


def test_exec_drops_the_old_mm_and_the_new_one_joins_as_a_newcomer(mounts: Mounts, children: list[Child]) -> None:
    """The old mm exits at the exec (scanning_process 1 -> 0 with no scan); the new one
    has no MMF_VM_MERGEABLE: the partial scan of the next request joins it as a newcomer
    (not short: the 150 ms of CPU survive the exec) and scans it."""
    c = Child(EXECER)
    children.append(c)
    mp = boot(mounts, "--pid", str(c.pid))
    assert read_attr(mp, "scanning_process") == "1\n"
    assert c.send() == "execd"
    wait_until(lambda: read_attr(mp, "scanning_process") == "0\n", TOLD, what="the old mm's exit")
    assert read_attr(mp, "full_scans") == "3\n"
    echo(mp, 1, "one_shot_scanning")
    wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
    assert read_attr(mp, "scanning_process") == "1\n"
    st = ksm_stat(mp, c.pid)
    assert "scanned" in st["state"] and "newcomer" not in st["state"]
    assert int(st["ksm_rmap_items"]) >= 16  # the new image's 16 pages of 0x33 at least
    assert int(st["ksm_merging_pages"]) >= 15  # which merge, in the newcomer's first scan


def test_madvise_registers_a_short_task_at_once(mounts: Mounts, children: list[Child]) -> None:
    """ksm_madvise() -> __ksm_enter(): registered when it madvises, with no scan and run=0,
    short as it is; once run=8 its scans see only the madvised mapping (ksm_join skips
    a short task): 16 rmap items, which all merge."""
    if ksm_registered(os.getpid()) is None:
        pytest.skip("no ksm_mergeable in /proc/PID/ksm_stat (Linux < 6.x): madvise is found at the prepare only")
    ok, why = KernelKsm.available()
    if not ok:
        pytest.skip(why)
    with KernelKsm():  # a VM_MERGEABLE child: hold the oracle users off (global counters)
        c = Child(MADVISER)
        children.append(c)
        if runtime_ns(c.pid) >= 100_000_000:
            pytest.skip("the child burnt 100 ms starting: not a short task here")
        mp = mounts.start("--pid", str(c.pid), "--no-freezer").mountpoint
        wait_until(lambda: mp.joinpath("run").exists(), DEADLINE)
        assert read_attr(mp, "run") == "0\n"
        assert read_attr(mp, "scanning_process") == "0\n"
        assert c.send() == "done"
        wait_until(lambda: read_attr(mp, "scanning_process") == "1\n", TOLD, what="the madvise's __ksm_enter")
        assert read_attr(mp, "full_scans") == "0\n"
        echo(mp, 8, "run")
        wait_until(lambda: read_attr(mp, "full_scans") == "3\n", DEADLINE)
        st = ksm_stat(mp, c.pid)
        assert int(st["ksm_rmap_items"]) == 16 and int(st["ksm_merging_pages"]) == 16
        c.close()


def test_a_request_after_run_8_to_0_is_prepared_at_once_and_served_by_run_8(
    mounts: Mounts, v2_cgroup: Callable[[], str],
) -> None:
    """run_store(0) leaves the crawler in lksm_do_wait_userspace_event(); the write to
    one_shot_scanning wakes it: lksm_prepare_full_scan() joins the newcomer n
    (scanning_process 1 -> 2) while run is 0, the request reads 2 (pending: ksmd needs
    the merge bit); `echo 8 > run` then serves it (a 4th full scan)."""
    group = v2_cgroup()
    with filled(8) as a:
        cgroups.attach(group, a.pid)
        mp = boot(mounts, "--cgroup", group)
        assert read_attr(mp, "scanning_process") == "1\n"
        echo(mp, 0, "run")
        with filled(8, value=0x11) as n:
            cgroups.attach(group, n.pid)
            echo(mp, 2, "one_shot_scanning")
            wait_until(lambda: read_attr(mp, "scanning_process") == "2\n", TOLD, what="the request prepared")
            assert read_attr(mp, "one_shot_scanning") == "2\n" and read_attr(mp, "full_scans") == "3\n"
            echo(mp, 8, "run")
            wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", DEADLINE)
            assert read_attr(mp, "full_scans") == "4\n"
            assert "scanned" in ksm_stat(mp, n.pid)["state"]
