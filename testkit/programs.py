"""Real programs as a workload: CPython with numpy and matplotlib, perl, node_exporter.

    with RealPrograms() as progs:
        progs.pids   # stopped (SIGSTOP), opted in to the kernel's KSM

Each program starts through a launcher that calls prctl(PR_SET_MEMORY_MERGE) and
prctl(PR_SET_THP_DISABLE) and then execs it: both survive execve (Linux 6.7+ for the first),
so the kernel's KSM may merge every VMA of the program (the scope lksmfs scans: all
anonymous pages of the pids given) and all of it is in 4 KiB pages.  Once a program has
said it is ready (a line on stdout, or node_exporter answering a scrape) it is stopped with
SIGSTOP, so its memory is still while lksmfs and the kernel look.  Every program is killed
and reaped on close(), whatever happened.  Only for runs under the kernel oracle's lock
(testkit.kernel_ksm.KernelKsm) or where nothing else drives the kernel's KSM: mergeable
processes skew its global counters.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from lksmfs.system.waiting import wait_until
from testkit.exporter import scrape
from testkit.memproc import wait_stopped

PR_SET_THP_DISABLE = 41
PR_SET_MEMORY_MERGE = 67
# prctl both, then exec argv[1:]: run with -S (no site, a few ms)
LAUNCHER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"for opt in ({PR_SET_THP_DISABLE}, {PR_SET_MEMORY_MERGE}):\n"
    "    if libc.prctl(opt, 1, 0, 0, 0) != 0:\n"
    "        raise OSError(ctypes.get_errno(), f'prctl({opt})')\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)
# prctl(PR_SET_MEMORY_MERGE) off and on again once running: the flag survives execve, but
# the stack VMA that exec sets up is not made VM_MERGEABLE (seen on Linux 6.18), and
# setting the flag again is a no-op; turned on anew it marks every VMA of the process.
# node_exporter (Go) cannot: its few stack pages stay out of the kernel's reach
# (pages_unshared may differ by them; the compared counters do not).
PLOTTER = (
    "import ctypes, io, sys\n"
    f"assert [ctypes.CDLL(None).prctl({PR_SET_MEMORY_MERGE}, v, 0, 0, 0) for v in (0, 1)] == [0, 0]\n"
    "import numpy as np, matplotlib\n"
    "matplotlib.use('Agg')\n"
    "import matplotlib.pyplot as plt\n"
    "x = np.linspace(0, 10, 20000)\n"
    "fig, ax = plt.subplots()\n"
    "ax.plot(x, np.sin(x) * float(sys.argv[1]))\n"
    "fig.savefig(io.BytesIO(), format='png')\n"
    "table = np.random.default_rng(int(sys.argv[1])).random(1 << 20)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)
PERL = (
    f"require 'syscall.ph'; syscall(&SYS_prctl, {PR_SET_MEMORY_MERGE}, $_, 0, 0, 0) == 0 or die for 0, 1;"
    " $| = 1; my %h; $h{$_} = ('k' x 64) . $_ for 1 .. $ARGV[0]; my @l = map { [$_, $_ * 2] } 1 .. $ARGV[0];"
    " print \"ready\\n\"; <STDIN>;"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealPrograms:
    """`plotters` CPython+numpy+matplotlib processes, `perls` perl processes and
    `exporters` node_exporters (if installed), stopped and mergeable."""

    def __init__(self, plotters: int = 4, perls: int = 3, exporters: int = 2, *,
                 python: str = sys.executable, timeout_s: float = 120.0) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.timeout_s = timeout_s
        exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
        try:
            ready: list[subprocess.Popen[bytes]] = []
            for i in range(plotters):
                ready.append(self._start([python, "-c", PLOTTER, str(i + 1)]))
            for i in range(perls):
                ready.append(self._start(["perl", "-e", PERL, str(30_000 + 20_000 * i)]))
            for p in ready:
                self._wait_line(p)
            for _ in range(exporters if exporter else 0):
                self._start_exporter(exporter or "")
            for p in self.procs:
                os.kill(p.pid, signal.SIGSTOP)
            for p in self.procs:
                wait_stopped(p.pid, timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _start(self, argv: Sequence[str], out: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, *argv], stdin=subprocess.PIPE,
                             stdout=out, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def _wait_line(self, p: subprocess.Popen[bytes]) -> None:
        """Wait (deadline) for the program's 'ready' line."""
        assert p.stdout is not None
        fd = p.stdout.fileno()
        deadline = time.monotonic() + self.timeout_s
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"program {p.args!r} not ready in {self.timeout_s} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"program {p.args!r} exited (rc={p.poll()})")
                buf += chunk

    def _start_exporter(self, binary: str) -> None:
        """A node_exporter with its default collectors, scraped once (its caches filled)."""
        port = _free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        p = self._start([binary, f"--web.listen-address=127.0.0.1:{port}"], out=subprocess.DEVNULL)

        def answers() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"node_exporter exited (rc={p.returncode})")
            try:
                scrape(url)
                return True
            except OSError:
                return False

        wait_until(answers, self.timeout_s, 0.05, what="node_exporter to answer")

    def close(self) -> None:
        """Kill (SIGKILL works on a stopped process) and reap every program."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        self.procs = []

    def __enter__(self) -> RealPrograms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
