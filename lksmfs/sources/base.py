"""The one small interface between the engine and wherever memory comes from.

The engine (lksmfs.engine) only ever talks to a `MemorySource`: the procfs source
reads real processes through /proc, the simulated source generates pages from a
workload file.  Everything here is expressed in kernel terms (task, VMA, anonymous
page) so that the engine can stay a faithful port of mm/lksm.c.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

# defined with the /proc knowledge they stand for; the engine imports them from here
from lksmfs.system.proc import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AccessDenied,
    ProcessGone,
    TaskFailed,
    TaskId,
    describe_error,
)

S = TypeVar("S")

__all__ = [
    "PAGE_SHIFT",
    "SourceWrapper",
    "PAGE_SIZE",
    "AccessDenied",
    "Mapping",
    "MemorySource",
    "ProcessGone",
    "TaskFailed",
    "TaskId",
    "TaskStat",
    "describe_error",
]


@dataclass(frozen=True, slots=True)
class TaskStat:
    """What the crawler needs about a task besides its memory (struct task_struct fields)."""

    comm: str
    runtime_ns: int  # se.sum_exec_runtime: /proc/PID/schedstat field 1
    faults: int  # maj_flt + min_flt: /proc/PID/stat fields 10 and 12
    anon_pages: int  # get_mm_counter(mm, MM_ANONPAGES): RssAnon / 4 KiB
    kthread: bool = False  # PF_KTHREAD: no mm, never scanned


@dataclass(frozen=True, slots=True)  # thousands per scope: no __dict__ each
class Mapping:
    """One VMA, as a line of /proc/PID/maps plus the smaps VmFlags ksm_join cares about.

    `start`/`end` are byte addresses.  `file` is the file identity (dev, inode) or None
    for an anonymous mapping.  `mergeable` is False for what ksm_join skips (VM_SHARED,
    VM_PFNMAP, VM_IO, VM_DONTEXPAND, VM_HUGETLB, VM_MIXEDMAP).  `has_anon` mirrors
    `vma->anon_vma != NULL`: the VMA has had an anonymous page.  `vm_mergeable` is
    VM_MERGEABLE (`mg` in smaps VmFlags): the process asked for KSM on it with
    madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE); only mainline ksmd needs it
    (LKSM's ksm_join marks every VMA itself).
    """

    start: int
    end: int
    perms: str = "rw-p"
    file: tuple[int, int] | None = None
    path: str = ""
    mergeable: bool = True
    has_anon: bool = True
    anon_pages: int = -1  # anonymous pages mapped (smaps `Anonymous:`), -1 when unknown
    huge_pages: int = 0  # of those, in PMD-mapped transparent huge pages (`AnonHugePages:`)
    vm_mergeable: bool = False

    @property
    def is_heap(self) -> bool:
        return self.path == "[heap]"

    @property
    def is_stack(self) -> bool:
        return self.path == "[stack]"

    @property
    def is_exec(self) -> bool:
        return "x" in self.perms

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def start_vpn(self) -> int:
        return self.start >> PAGE_SHIFT

    @property
    def end_vpn(self) -> int:
        return self.end >> PAGE_SHIFT


@runtime_checkable
class MemorySource(Protocol):
    """Where the engine gets tasks and pages from.

    Every per-task call may raise ProcessGone or AccessDenied.  Calls for one task are
    made by one thread at a time; different tasks may be read from different threads.
    """

    def tasks(self) -> list[TaskId]:
        """Every user task in scope (for_each_process, less kernel threads and ourselves)."""
        ...

    def stat(self, task: TaskId) -> TaskStat:
        """Comm, CPU runtime, fault count and anonymous page count of `task`."""
        ...

    def mappings(self, task: TaskId) -> list[Mapping]:
        """The task's VMAs in address order (the vm_next / vm_prev chain)."""
        ...

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        """Sorted uint64 virtual page numbers in [start_vpn, end_vpn) that are present and
        anonymous (follow_page + PageAnon): not the shared zero page, not a file page."""
        ...

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        """Contents of the given pages, concatenated in order (len(vpns) * PAGE_SIZE bytes).

        Without `out` the returned view may be a reused buffer, valid until the next call
        without `out` for any task; with `out` (at least that long) the pages are written
        there and a view of it is returned: a second read need not disturb the first.
        """
        ...

    def thp_blocks(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        """The 2 MiB blocks (vpn // 512, int64, sorted) of [start_vpn, end_vpn) mapped as
        a PMD-sized transparent huge page; empty where the source knows of none."""
        ...

    def cpu_mark(self, task: TaskId) -> Hashable | None:
        """Something equal at two moments only if the task ran no instruction in
        between (per-thread CPU time), or None when the source cannot tell.  A task that
        did not run has the same private anonymous memory, so pages read and digested
        before are not read again (the scanner's cpu_mark rule)."""
        ...

    def release(self, task: TaskId) -> None:
        """Forget per-task resources (open fds): the engine dropped the slot."""
        ...

    def close(self) -> None:
        """Release everything."""
        ...


class SourceWrapper:
    """A MemorySource that is another one (`inner`) with some calls narrowed: subclasses
    override what they change (the ranges source, mainline ksmd's view)."""

    def __init__(self, inner: MemorySource) -> None:
        self.inner = inner

    def tasks(self) -> list[TaskId]:
        return self.inner.tasks()

    def stat(self, task: TaskId) -> TaskStat:
        return self.inner.stat(task)

    def mappings(self, task: TaskId) -> list[Mapping]:
        return self.inner.mappings(task)

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        return self.inner.present_anon(task, start_vpn, end_vpn)

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        return self.inner.read_pages(task, vpns, out)

    def thp_blocks(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        return self.inner.thp_blocks(task, start_vpn, end_vpn)

    def cpu_mark(self, task: TaskId) -> Hashable | None:
        return self.inner.cpu_mark(task)

    def release(self, task: TaskId) -> None:
        self.inner.release(task)

    def close(self) -> None:
        self.inner.close()


def inner_source(source: object, kind: type[S]) -> S | None:
    """The source of `kind` (a runtime-checkable protocol) under the engine's: the source
    itself, or one a wrapper keeps in its `inner` (mainline's view, a range filter)."""
    inner: object = source
    while not isinstance(inner, kind):
        inner = getattr(inner, "inner", None)
        if inner is None:
            return None
    return inner
