"""A tiny in-memory MemorySource for unit tests of engine rules.

Each fake process is a list of VMAs whose present anonymous pages are given explicitly
(page offset -> content).  Tests change contents between scans to play a workload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

import lksmfs.engine.thp as thp
from lksmfs.sources.base import PAGE_SHIFT, PAGE_SIZE, Mapping, ProcessGone, TaskId, TaskStat


def fill(byte: int | str) -> bytes:
    """A page filled with one byte value ('a' or 97)."""
    b = ord(byte) if isinstance(byte, str) else byte
    return bytes([b]) * PAGE_SIZE


def unique(tag: int) -> bytes:
    """A page no other tag produces."""
    return tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


@dataclass
class FakeVma:
    mapping: Mapping
    pages: dict[int, bytes] = field(default_factory=dict)  # offset -> content


@dataclass
class FakeProc:
    task: TaskId
    comm: str
    vmas: list[FakeVma]
    runtime_ns: int = 10**9
    faults: int = 0


class FakeSource:
    """Implements lksmfs.sources.base.MemorySource over FakeProc objects."""

    def __init__(self) -> None:
        self.procs: dict[TaskId, FakeProc] = {}
        self.released: list[TaskId] = []
        # alive and readable, but not listed by tasks(): outside the daemon's scope
        self.hidden: set[TaskId] = set()
        self.cpu_marks = False  # tell the engine when a process has not run (cpu_mark)
        self._next_pid = 1000
        self.reads = 0
        self.pages_read = 0
        self.huge: dict[TaskId, set[int]] = {}  # blocks (vpn // 512) mapped as a THP

    def add(
        self, comm: str, vmas: list[tuple[Mapping, dict[int, bytes]]], runtime_ms: int = 1000, pid: int | None = None
    ) -> TaskId:
        if pid is None:
            pid = self._next_pid
            self._next_pid += 1
        task = TaskId(pid, 1)
        self.procs[task] = FakeProc(task, comm, [FakeVma(m, dict(p)) for m, p in vmas], runtime_ms * 10**6)
        return task

    def anon(self, comm: str, pages: list[bytes], base: int = 0x10000000, **kw: int) -> TaskId:
        """A process with one anonymous mapping holding `pages` in order."""
        m = Mapping(base, base + len(pages) * PAGE_SIZE)
        return self.add(comm, [(m, dict(enumerate(pages)))], **kw)

    def anon_thp(self, comm: str, pages: list[bytes], base: int = 0x10000000, **kw: int) -> TaskId:
        """A process with one anonymous mapping (2 MiB aligned) of `pages`, every whole
        huge page's worth of it (thp.HPAGE_PMD_NR pages) mapped as a huge page."""
        m = Mapping(base, base + len(pages) * PAGE_SIZE)
        task = self.add(comm, [(m, dict(enumerate(pages)))], **kw)
        self.make_huge(task, 0)
        return task

    def make_huge(self, task: TaskId, vma: int) -> None:
        """Map every whole huge page's worth of VMA `vma` whose pages are all present as a
        huge page."""
        v = self.procs[task].vmas[vma]
        nr = thp.HPAGE_PMD_NR
        full = [b for b in range(v.mapping.npages // nr) if all(b * nr + o in v.pages for o in range(nr))]
        v.mapping = dataclasses.replace(v.mapping, huge_pages=len(full) * nr)
        self.huge.setdefault(task, set()).update((v.mapping.start_vpn >> thp.HPAGE_PMD_ORDER) + b for b in full)

    def set_page(self, task: TaskId, vma: int, offset: int, content: bytes | None) -> None:
        """Write (or unmap, with None) one page; a write counts as a fault."""
        p = self.procs[task]
        if content is None:
            p.vmas[vma].pages.pop(offset, None)
        else:
            p.vmas[vma].pages[offset] = content
        p.faults += 1

    def kill(self, task: TaskId) -> None:
        del self.procs[task]

    def _get(self, task: TaskId) -> FakeProc:
        try:
            return self.procs[task]
        except KeyError:
            raise ProcessGone(str(task)) from None

    # -- MemorySource ---------------------------------------------------------------

    def tasks(self) -> list[TaskId]:
        return [t for t in self.procs if t not in self.hidden]

    def stat(self, task: TaskId) -> TaskStat:
        p = self._get(task)
        return TaskStat(p.comm, p.runtime_ns, p.faults, sum(len(v.pages) for v in p.vmas))

    def mappings(self, task: TaskId) -> list[Mapping]:
        return [v.mapping for v in self._get(task).vmas]

    def _page(self, p: FakeProc, vpn: int) -> bytes:
        for v in p.vmas:
            if v.mapping.start_vpn <= vpn < v.mapping.end_vpn:
                return v.pages[vpn - v.mapping.start_vpn]
        raise ProcessGone(f"vpn {vpn:#x} not mapped")

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        p = self._get(task)
        out: list[int] = []
        for v in p.vmas:
            s = v.mapping.start_vpn
            out += [s + o for o in v.pages if start_vpn <= s + o < end_vpn]
        return np.array(sorted(out), dtype=np.uint64)

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        p = self._get(task)
        self.reads += 1
        self.pages_read += len(vpns)
        data = b"".join(self._page(p, int(v)) for v in vpns)
        if out is None:
            return memoryview(data)
        out[: len(data)] = data
        return out[: len(data)]

    def thp_blocks(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        self._get(task)
        order = thp.HPAGE_PMD_ORDER
        return np.array(sorted(b for b in self.huge.get(task, ())
                               if start_vpn <= b << order and (b + 1) << order <= end_vpn), dtype=np.int64)

    def cpu_mark(self, task: TaskId) -> tuple[int, int] | None:
        """None (the engine reads every page every time), unless `cpu_marks`: then the
        runtime and the writes, which change whenever set_page() writes."""
        if not self.cpu_marks:
            return None
        p = self._get(task)
        return p.runtime_ns, p.faults

    def release(self, task: TaskId) -> None:
        self.released.append(task)

    def close(self) -> None:
        pass


def addr(vpn: int) -> int:
    return vpn << PAGE_SHIFT
