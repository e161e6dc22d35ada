"""Process churn under a running engine (root): hundreds of short-lived real processes
are born and killed while full and partial scans run, some of them killed in the middle
of their own scan.  Afterwards nothing of them is left in the engine, the source holds no
fd for them, the test process did not grow, and the counters add up at every step.

Everything happens in one cgroup made for the churn (the engine's scope), so the rest of
the machine is out of it.  The processes are forked by a small zygote (python -S) in
that cgroup: a fork costs about a millisecond where a fresh interpreter costs ~20 ms of
CPU, so 300 of them fit in a few seconds.  The zygote ignores SIGCHLD, so the kernel
reaps its children at once: a killed child disappears from /proc (no zombies).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import KSM_RUN_ONESHOT, LKSM_SCAN_FULL, LKSM_SCAN_NONE, LKSM_SCAN_PARTIAL
from lksmfs.sources.base import TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.system.cgroups import procs as _procs
from lksmfs.system.proc import status_kib
from lksmfs.system.waiting import wait_until
from testkit.engine import check_counters, open_fd_count, settle, task_of

pytestmark = pytest.mark.live

TOTAL = 300  # churn processes forked
MAX_ALIVE = 16  # at any time
LONG_EVERY = 10  # every 10th one burns > 100 ms of CPU: registered by the next scan
FORKS_PER_STEP = 2
SLICE_S = 0.02  # wall time given to the engine per step of the churn loop
BATCH = 32  # pages per scanner batch: slots are scanned in many steps
PAGES = 4  # pages each churn process maps (on top of what it inherits from the zygote)
MAX_OPEN = 16  # ProcfsSource fd cache bound (tasks)
RSS_BOUND_KIB = 8 * 1024  # see the end of the test

# The zygote: burns 150 ms (so it is registered: a survivor), then forks on request.
#   stdin "fork CPU_MS" -> stdout "PID"
# A child maps PAGES anonymous pages (page 0 the same in every child, the others random),
# uses CPU_MS of CPU, and sleeps until it is killed.
_ZYGOTE = r"""
import mmap, os, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
def runtime():
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0])
def burn(ms):
    x = 0
    while runtime() < ms * 1000000:
        for i in range(20000):
            x ^= i
burn(150)
print("ready", flush=True)
for line in sys.stdin:
    cpu_ms = int(line.split()[1])
    pid = os.fork()
    if pid == 0:
        try:
            m = mmap.mmap(-1, PAGES * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m[:4096] = b"\x5a" * 4096
            for i in range(1, PAGES):
                m[i * 4096:(i + 1) * 4096] = os.urandom(4096)
            burn(cpu_ms)
            while True:
                signal.pause()
        finally:
            os._exit(1)
    print(pid, flush=True)
""".replace("PAGES", str(PAGES))


@dataclass
class Zygote:
    proc: subprocess.Popen[str]
    forked: list[int]

    def fork(self, cpu_ms: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"fork {cpu_ms}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "zygote died"
        pid = int(line)
        self.forked.append(pid)
        return pid


@pytest.fixture
def zygote(live: Any, v2_cgroup: Callable[[], str]) -> Iterator[tuple[Zygote, str]]:
    """A zygote in a fresh v2 cgroup; at the end every process in that cgroup is killed
    (cgroup.kill, and by pid as a fallback) before the cgroup fixture removes it."""
    g = v2_cgroup()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _ZYGOTE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    z = Zygote(proc, [])
    try:
        live.move_to_cgroup(g, proc.pid)  # before it forks anything
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield z, g
    finally:
        with contextlib.suppress(OSError):
            live.write(os.path.join(g, "cgroup.kill"), "1")
        for pid in [*z.forked, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for s in (proc.stdin, proc.stdout):
            if s is not None:
                s.close()
        wait_until(lambda: not _procs(g), 5.0)


def _kill(pid: int, task: TaskId) -> None:
    """SIGKILL and wait (deadline) until the process is gone (auto-reaped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: task_of(pid) != task, 5.0, what=f"{task} to die of SIGKILL")


@dataclass
class Churner:
    task: TaskId
    due: float  # monotonic time of its scheduled death
    victim: bool  # to be killed as soon as it is seen mid-scan


@pytest.fixture
def source(zygote: tuple[Zygote, str]) -> Iterator[ProcfsSource]:
    """The engine's source, scoped to the churn cgroup; closed whatever happens (it opens
    no fd before its first read)."""
    src = ProcfsSource(scope=Scope(cgroups=[zygote[1]]), max_open_tasks=MAX_OPEN)
    try:
        yield src
    finally:
        src.close()


def test_churn_leaves_nothing_behind(zygote: tuple[Zygote, str], source: ProcfsSource) -> None:
    z, g = zygote
    src = source
    rng = random.Random(2024)
    zyg = task_of(z.proc.pid)
    keeper_pid = z.fork(110)  # a second survivor, forked like the others, never killed
    keeper = task_of(keeper_pid)
    assert zyg is not None and keeper is not None
    survivors = {zyg, keeper}

    base_fds = open_fd_count()
    ksm = Ksm(src, self_pid=os.getpid())
    ksm.set_run(KSM_RUN_ONESHOT)
    vnow = settle(ksm, 0.0)  # the 3 initial full scans, survivors only: buffers warmed up
    assert zyg in ksm.slots
    rss0 = status_kib("VmRSS")

    alive: dict[int, Churner] = {}
    registered: set[TaskId] = set()  # churn tasks the engine ever registered
    churn: set[TaskId] = set()
    long_lived: set[TaskId] = set()
    mid_scan_kills = 0
    scans = {LKSM_SCAN_FULL: 0, LKSM_SCAN_PARTIAL: 0}
    next_mode = LKSM_SCAN_PARTIAL
    forked = 0
    while forked < TOTAL or alive:  # ends: TOTAL forks, each killed once its life is over
        now = time.monotonic()
        for pid, c in list(alive.items()):
            if c.due <= now:  # killed whenever: between scans, or mid-scan of another
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                del alive[pid]
        for _ in range(FORKS_PER_STEP):
            if forked == TOTAL or len(alive) >= MAX_ALIVE:
                break
            long = forked % LONG_EVERY == 0
            victim = long and forked // LONG_EVERY % 2 == 1  # half of the long ones
            pid = z.fork(110 if long else 0)
            forked += 1
            t = task_of(pid)
            assert t is not None  # it sleeps until killed
            churn.add(t)
            if long:
                long_lived.add(t)
            life = rng.uniform(0.5, 2.0) if long else rng.uniform(0.01, 0.15)
            alive[pid] = Churner(t, now + life, victim)

        # the engine's share of the loop: scanner batches and crawler passes for a
        # slice of wall time, so scans progress at their own pace whatever the churn
        slice_end = time.monotonic() + SLICE_S
        while time.monotonic() < slice_end:
            was_scanning = ksm.scan_state
            if ksm.scanner_should_run():
                ksm.scan_batch(BATCH)
                cur = ksm.cur
                c = alive.get(cur.task.pid) if cur is not None else None
                if cur is not None and c is not None and c.victim and c.task == cur.task:
                    # killed in the middle of its own scan, hundreds of its pages still
                    # to read (at most one chunk may have been read ahead): the scanner
                    # meets a task that is gone and the slot leaves during this very
                    # scan (ProcessGone path), not completed and kept until the next one
                    _kill(cur.task.pid, cur.task)
                    del alive[cur.task.pid]
                    mid_scan_kills += 1
                    exited = ksm.counters()["tasks_exited"]
                    for _ in range(1000):
                        if ksm.cur is not cur:
                            break
                        ksm.scan_batch(BATCH)
                    assert ksm.cur is not cur and cur.task not in ksm.slots
                    # (>=: the same batch may go on to another slot whose task was
                    # killed on schedule, and that one leaves as an exit too)
                    assert ksm.counters()["tasks_exited"] >= exited + 1
            else:
                nxt = ksm.crawl(vnow)
                if nxt is not None:
                    vnow = max(vnow, nxt)
                elif not ksm.scan_state and ksm.tunables.one_shot_scanning == LKSM_SCAN_NONE:
                    assert ksm.request_one_shot(next_mode)  # full and partial in turn
                    next_mode = (LKSM_SCAN_FULL if next_mode == LKSM_SCAN_PARTIAL
                                 else LKSM_SCAN_PARTIAL)
            registered |= churn & set(ksm.slots)
            if was_scanning and not ksm.scan_state:
                scans[int(ksm.last_scan["mode"])] += 1
                check_counters(ksm, quiescent=True)
            else:
                check_counters(ksm, quiescent=False)
            assert src.open_tasks() <= MAX_OPEN
            # cached tasks' fds (dir, pagemap, mem) + kpageflags once opened
            assert open_fd_count() <= base_fds + 3 * src.open_tasks() + src.kpageflags_open

    # the churn really did what it claims
    assert forked == TOTAL and len(churn) == TOTAL
    assert scans[LKSM_SCAN_FULL] >= 2 and scans[LKSM_SCAN_PARTIAL] >= 2, scans
    # short-task rule: only those that used 100 ms of CPU were ever registered
    assert registered <= long_lived
    assert len(registered) >= len(long_lived) // 2, (len(registered), len(long_lived))
    assert mid_scan_kills >= 1

    # every churn process is gone; one more full scan
    wait_until(lambda: set(_procs(g)) == {zyg.pid, keeper.pid}, 5.0)
    vnow = settle(ksm, vnow)
    assert ksm.request_one_shot(LKSM_SCAN_FULL)
    settle(ksm, vnow)
    final = check_counters(ksm, quiescent=True)
    assert set(ksm.slots) == survivors and not ksm.mm.remove_list
    assert final["scanning_process"] == 2
    assert final["rmap_items"] == sum(len(s.rmap) for s in ksm.slots.values()) > 0
    # each registered churn task left exactly once, as an exit (none were refused)
    assert final["tasks_exited"] == len(registered) > 0
    assert final["tasks_denied"] == 0
    # the source holds fds for the survivors only (dir, pagemap, mem each + kpageflags)
    assert src.open_tasks() == 2
    assert open_fd_count() == base_fds + 2 * 3 + src.kpageflags_open
    src.close()
    assert open_fd_count() == base_fds
    # Memory: what the engine keeps is ~26 bytes per tracked page (two survivors, under
    # 2,000 pages) plus the per-thread read buffer, which the warm-up scans already grew
    # to the largest chunk the final scan reads; a scan's transients (one chunk's copy
    # and digests) are freed.  So the steady state is flat (measured: +0.1 to +0.2 MiB).
    # 8 MiB leaves room for allocator slack, while holding on to the contents of even
    # two of the ~30 registered processes (~700 pages, 2.8 MiB each) would exceed it.
    # (Leaked rmap items or slots are caught exactly by the checks above.)
    assert status_kib("VmRSS") - rss0 <= RSS_BOUND_KIB
