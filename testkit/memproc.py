"""Real processes with known memory: testkit/memchild.py started and driven from a test.

    with MemProcess(Region("data", [(64, 0x5A)]), cpu_ms=150) as p:
        p.pid, p.addr("data"), p.vpn("data"), p.task

Every process is killed and reaped by close() (or the context manager), whatever
happened; a child that does not answer in time raises TimeoutError, one that dies
RuntimeError with its exit status.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lksmfs.system.proc import PAGE_SHIFT, PAGE_SIZE, TaskId, state, task_id
from lksmfs.system.waiting import wait_until
from testkit.patterns import Pages, Region, child_spec, format_pages

CHILD = Path(__file__).with_name("memchild.py")
PATTERN = "pattern"  # the region name of an oracle pattern process


class MemProcess:
    """A running memchild: its regions' addresses, and the commands it takes."""

    def __init__(
        self,
        *regions: Region,
        comm: str | None = None,
        cpu_ms: int = 0,
        merge: bool = False,
        stop: bool = False,
        timeout_s: float = 60.0,
        wait: bool = True,
        user: Sequence[str] = (),
        python: str = sys.executable,
        thp: bool = False,
        child: Path = CHILD,
    ) -> None:
        """Start the child; unless `wait` is False, wait until its memory is built.
        `user` prefixes the command (e.g. testkit.mount.NOBODY, with a `python` that user
        may run, and a `child` - a copy of memchild.py - that user may read).  `thp`:
        transparent huge pages stay allowed (regions with `hugepage`)."""
        self.stop_mode = stop
        self.timeout_s = timeout_s
        self.regions: dict[str, tuple[int, int]] = {}  # name -> (address, npages)
        options: dict[str, object] = {"cpu_ms": cpu_ms, "merge": merge, "stop": stop, "thp": thp}
        if comm is not None:
            options["comm"] = comm
        self.proc = subprocess.Popen(
            [*user, python, "-S", str(child), child_spec(regions, **options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self.pid = self.proc.pid
        self._buf = b""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Read the child's report (and, in stop mode, wait until it has stopped itself)."""
        try:
            info = json.loads(self._readline())
            self.regions = {name: (int(a), int(n)) for name, (a, n) in info["regions"].items()}
            if self.stop_mode:
                wait_stopped(self.pid, self.timeout_s)
        except BaseException:
            self.close()
            raise

    # -- where things are

    def addr(self, region: str) -> int:
        return self.regions[region][0]

    def vpn(self, region: str) -> int:
        return self.regions[region][0] >> PAGE_SHIFT

    def npages(self, region: str) -> int:
        return self.regions[region][1]

    @property
    def task(self) -> TaskId:
        return task_id(self.pid)

    def ksm_pages(self, region: str = PATTERN) -> int:
        """Pages of `region` the kernel's KSM has merged right now (smaps ``KSM:``)."""
        return smaps_ksm_pages(self.pid, self.addr(region))

    # -- commands

    def _readline(self) -> str:
        """One line from the child's stdout, with a deadline (select, no blocking read)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"memchild {self.pid}: no answer in {self.timeout_s} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"memchild {self.pid} exited (rc={self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, line: str) -> str:
        """Send one command line, return the answer; in stop mode the child is stopped
        before and after (its memory is still whenever we look)."""
        assert self.proc.stdin is not None
        if self.stop_mode:
            wait_stopped(self.pid, self.timeout_s)
        self.proc.stdin.write(line.encode() + b"\n")
        if self.stop_mode:
            os.kill(self.pid, signal.SIGCONT)
        answer = self._readline()
        if answer.startswith("error"):
            raise RuntimeError(f"memchild {self.pid}: {line!r}: {answer}")
        if self.stop_mode:
            wait_stopped(self.pid, self.timeout_s)
        return answer

    def rewrite(self, region: str, pages: Pages) -> int:
        """Rewrite a region (same page count) as one phase; returns the phase number."""
        got = sum(c for c, _ in pages)
        if got != self.npages(region):
            raise ValueError(f"phase spec has {got} pages, region {region} {self.npages(region)}")
        answer = self.command(f"rewrite {region} {format_pages(pages)}")
        return int(answer.split()[1])

    def fork(self, *regions: Region, cpu_ms: int = 0) -> int:
        """A forked copy that maps `regions`, uses `cpu_ms` of CPU and sleeps until killed."""
        return int(self.command("fork " + child_spec(regions, cpu_ms=cpu_ms)))

    def close(self) -> None:
        """Kill and reap; safe to call twice."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()  # SIGKILL works on a stopped process
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> MemProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def filled(npages: int, value: int = 0x5A, *, cpu_ms: int = 150, comm: str | None = None,
           user: Sequence[str] = (), python: str = sys.executable, child: Path = CHILD) -> MemProcess:
    """A process holding `npages` identical pages of byte `value` (one group of npages),
    past LKSM's short-task threshold: what a daemon test scans."""
    return MemProcess(Region("data", [(npages, value)]), cpu_ms=cpu_ms, comm=comm, user=user,
                      python=python, child=child)


OUTSIDE = "outside"  # the madvise scope's twin of the pattern mapping, not madvised


def pattern_process(spec: Pages, *, cpu_ms: int = 150, timeout_s: float = 60.0,
                    wait: bool = True, scope: str = "prctl", thp: bool = False) -> MemProcess:
    """A kernel-oracle process, stopped whenever we look: one pattern mapping, mergeable
    through prctl(PR_SET_MEMORY_MERGE) (`scope` prctl: the whole process, runtime
    included) or through madvise(MADV_MERGEABLE) on the pattern mapping alone (`scope`
    madvise: a second mapping with the same pages, not madvised, stays out of KSM).
    `thp`: the pattern mapping is 2 MiB aligned and madvised for transparent huge pages."""
    if scope == "madvise":
        regions = (Region(PATTERN, spec, madvise=True), Region(OUTSIDE, spec))
        return MemProcess(*regions, cpu_ms=cpu_ms, stop=True, timeout_s=timeout_s, wait=wait)
    return MemProcess(Region(PATTERN, spec, hugepage=thp), cpu_ms=cpu_ms, merge=True, stop=True,
                      timeout_s=timeout_s, wait=wait, thp=thp)


class PatternGroup:
    """Several pattern processes started together and closed together (always)."""

    def __init__(self, specs: Sequence[Pages], *, cpu_ms: int = 150, timeout_s: float = 60.0,
                 scope: str = "prctl", thp: bool = False) -> None:
        self.procs: list[MemProcess] = []
        try:
            for spec in specs:  # spawn all first: they fill their pages in parallel
                self.procs.append(pattern_process(spec, cpu_ms=cpu_ms, timeout_s=timeout_s, wait=False,
                                                  scope=scope, thp=thp))
            for p in self.procs:
                p.wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rewrite(self, specs: Sequence[Pages]) -> None:
        for p, spec in zip(self.procs, specs, strict=True):
            p.rewrite(PATTERN, spec)

    def ksm_pages(self) -> int:
        return sum(p.ksm_pages() for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.close()

    def __enter__(self) -> PatternGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_stopped(pid: int, timeout_s: float = 30.0) -> None:
    """Wait (deadline) until `pid` is in state T (stopped by a signal)."""

    def stopped() -> bool:
        st = state(pid)
        if st in ("", "Z", "X"):
            raise RuntimeError(f"memchild {pid} died (state {st!r})")
        return st == "T"

    wait_until(stopped, timeout_s, 0.002, what=f"memchild {pid} to stop itself")


def smaps_ksm_pages(pid: int, addr: int) -> int:
    """The kernel's ``KSM:`` figure (merged pages) for the VMA starting at `addr`, in pages."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    inside = False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == addr
        elif inside and line.startswith("KSM:"):
            return int(line.split()[1]) * 1024 // PAGE_SIZE
    raise LookupError(f"no KSM: line for mapping {addr:#x} of pid {pid}")
