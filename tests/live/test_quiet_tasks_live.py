"""A process that has not run since its last scan is not read again (root).

MemorySource.cpu_mark on /proc: every thread's sum_exec_runtime.  Equal before two
scans, it says the process ran no instruction in between, so its private anonymous
pages are those the last scan read and digested; the scanner then reads only the pages
a new KSM page is made of (a byte-for-byte comparison is never skipped).  The counters
are the ones reading everything gives - worked out by hand below.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.sources.base import SourceWrapper, TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.system.proc import task_id
from lksmfs.system.waiting import wait_until
from testkit.memproc import PatternGroup

pytestmark = pytest.mark.live


class Counting(SourceWrapper):
    """Counts the pages read, per task."""

    def __init__(self, inner: ProcfsSource) -> None:
        super().__init__(inner)
        self.pages: dict[int, int] = {}

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        self.pages[task.pid] = self.pages.get(task.pid, 0) + len(vpns)
        return super().read_pages(task, vpns, out)


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_cpu_mark_holds_while_a_task_sleeps_and_moves_while_it_runs(live: Any, busy: Any) -> None:
    with PatternGroup([[(4, 0x33)]]) as group, ProcfsSource() as src:
        sleeper = task_id(group.pids[0])
        first = src.cpu_mark(sleeper)
        assert first is not None and first[0][0] == sleeper.pid  # (tid, runtime) per thread
        time.sleep(0.05)
        assert src.cpu_mark(sleeper) == first
        runner = task_id(busy.pid)
        mark = src.cpu_mark(runner)
        assert wait_until(lambda: src.cpu_mark(runner) != mark, 5.0, what="the busy task's CPU time to move")


def test_a_process_that_did_not_run_is_read_only_where_pages_merge(live: Any) -> None:
    """Two stopped processes of 3000 zero-filled pages each, max_page_sharing 256, two
    engines on them: one told when a process ran, one reading every page every time.
    Scan 1 reads everything in both (checksums: all volatile).  Scan 2 (no checksum
    changed) gets the same counters in both, but the first engine reads nothing except
    the two pages of each new KSM page: 6000 pattern pages in dups of 256 make 24 dups,
    48 pages, and a few of the children's own runtime pages.  Then one process writes:
    the first engine reads it alone again, and the counters still agree."""
    n = 3000
    with PatternGroup([[(n, "zero")], [(n, "zero")]]) as group:
        a, b = group.pids
        engines = []
        for quiet in (True, False):
            inner = ProcfsSource(scope=Scope(pids={a, b}))
            if not quiet:
                inner.cpu_mark = lambda task: None  # type: ignore[method-assign]
            src = Counting(inner)
            ksm = Ksm(src, filter_enabled=False, self_pid=inner.self_pid)
            ksm.tunables.max_page_sharing = 256
            engines.append((ksm, src, inner))
        try:
            def scan_both() -> list[dict[int, int]]:
                out = []
                for ksm, src, _ in engines:
                    src.pages.clear()
                    ksm.full_scan()
                    out.append(dict(src.pages))
                quiet_c, read_c = (e[0].counters() for e in engines)
                for key in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                            "stable_node_chains", "stable_node_dups"):
                    assert quiet_c[key] == read_c[key], key
                return out

            first = scan_both()
            assert first[0][a] >= n and first[0][b] >= n
            second = scan_both()
            assert second[1][a] >= n and second[1][b] >= n  # reading everything
            assert 48 <= second[0].get(a, 0) + second[0].get(b, 0) < 200, second[0]
            c = engines[0][0].counters()
            assert c["pages_shared"] >= 24 and c["pages_sharing"] >= 2 * n - 24
            group.procs[0].rewrite("pattern", [(n, 0x44)])  # a runs and writes
            third = scan_both()
            assert third[0].get(a, 0) >= n and third[0].get(b, 0) < 100, third[0]
        finally:
            for _, _, inner in engines:
                inner.close()
