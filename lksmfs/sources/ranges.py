"""A MemorySource that shows only some address ranges of some processes of another one.

What a measurement of part of a process's memory needs: the demo scans only the pages a
workload defines in its real children, leaving their Python runtime out, and compares
that with the workload model.  Everything else (tasks, VMAs, contents) is the inner
source's; only present_anon is narrowed, so the engine never sees the other pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lksmfs.sources.base import Mapping as Vma
from lksmfs.sources.base import MemorySource, TaskId, TaskStat


class RangeFilteredSource:
    """`inner` restricted to `ranges`: pid -> [(start_vpn, end_vpn)]; other pids are left out."""

    def __init__(self, inner: MemorySource, ranges: Mapping[int, Sequence[tuple[int, int]]]) -> None:
        self.inner = inner
        self.ranges = ranges

    def tasks(self) -> list[TaskId]:
        return [t for t in self.inner.tasks() if t.pid in self.ranges]

    def stat(self, task: TaskId) -> TaskStat:
        return self.inner.stat(task)

    def mappings(self, task: TaskId) -> list[Vma]:
        return self.inner.mappings(task)

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        vpns = self.inner.present_anon(task, start_vpn, end_vpn)
        keep = np.zeros(len(vpns), dtype=bool)
        for lo, hi in self.ranges.get(task.pid, ()):
            keep |= (vpns >= np.uint64(lo)) & (vpns < np.uint64(hi))
        return vpns[keep]

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        return self.inner.read_pages(task, vpns, out)

    def release(self, task: TaskId) -> None:
        self.inner.release(task)

    def close(self) -> None:
        self.inner.close()
