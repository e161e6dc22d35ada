"""ProcfsSource against real processes, real /proc, real kpageflags (root)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from lksmfs.sources.base import PAGE_SIZE, MemorySource, ProcessGone, TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.system.proc import state, task_id

pytestmark = pytest.mark.live

PAGE = PAGE_SIZE
# fixtures from tests/live/conftest.py
SpawnFn = Callable[..., Any]  # spawn_mem_child(private, zero=, untouched=, shared=, comm=)
CgroupFactory = Callable[[], str]


def _tid(pid: int) -> TaskId:
    return task_id(pid)


@pytest.fixture
def src(live: Any) -> Iterator[ProcfsSource]:
    s = ProcfsSource()
    try:
        yield s
    finally:
        s.close()


def test_is_a_memory_source(src: ProcfsSource) -> None:
    assert isinstance(src, MemorySource)


def test_tasks_lists_children_not_self_not_kthreads(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    c = spawn_mem_child([1])
    tasks = src.tasks()
    pids = {t.pid for t in tasks}
    assert c.pid in pids
    assert os.getpid() not in pids
    assert 2 not in pids  # kthreadd
    assert _tid(c.pid) in tasks


def test_stat_of_a_child(src: ProcfsSource, spawn_mem_child: SpawnFn) -> None:
    c = spawn_mem_child([7] * 64, comm="lksmfs-stat")
    st = src.stat(_tid(c.pid))
    assert st.comm == "lksmfs-stat"
    assert not st.kthread
    assert st.runtime_ns > 0
    # every written page was a minor fault; RssAnon holds at least the 64 written pages
    assert st.faults >= 64
    assert st.anon_pages >= 64


def test_present_anon_counts_exactly_written_private_pages(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    # 6 written pages, 2 read-only-touched (zero page), 3 never touched; 2 shared pages
    c = spawn_mem_child([1, 2, 3, 4, 5, 6], zero=2, untouched=3, shared=[9, 9])
    t = _tid(c.pid)
    v0 = c.vpn("private")
    got = src.present_anon(t, v0, v0 + 11)
    assert got.dtype == np.uint64
    assert got.tolist() == list(range(v0, v0 + 6))
    assert not src.fallback_used  # the zero pages were told apart by kpageflags
    # the MAP_SHARED region is present memory but not anonymous private memory
    assert src.present_anon(t, c.vpn("shared"), c.vpn("shared") + 2).tolist() == []


def test_mappings_mark_shared_unmergeable(src: ProcfsSource, spawn_mem_child: SpawnFn) -> None:
    c = spawn_mem_child([1, 2], shared=[3])
    maps = src.mappings(_tid(c.pid))
    starts = [m.start for m in maps]
    assert starts == sorted(starts)
    priv = [m for m in maps if m.start <= c.addr("private") < m.end]
    shared = [m for m in maps if m.start <= c.addr("shared") < m.end]
    assert len(priv) == 1 and len(shared) == 1
    assert priv[0].mergeable and priv[0].has_anon and priv[0].file is None
    assert shared[0].perms[3] == "s" and not shared[0].mergeable
    assert not any(m.path == "[vsyscall]" for m in maps)
    assert all(not m.mergeable for m in maps if m.path in ("[vdso]", "[vvar]"))
    # the python binary is a file mapping with a real (dev, inode)
    exe = os.stat(f"/proc/{c.pid}/exe")
    assert any(m.file == (exe.st_dev, exe.st_ino) for m in maps)


def test_read_pages_returns_written_bytes(src: ProcfsSource, spawn_mem_child: SpawnFn) -> None:
    pattern = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
    c = spawn_mem_child(pattern)
    t = _tid(c.pid)
    v0 = c.vpn("private")
    # runs [0,1,2] [5] [7] and an out-of-order page: coalesced reads, order preserved
    idx = [0, 1, 2, 5, 7, 3]
    vpns = np.array([v0 + i for i in idx], dtype=np.uint64)
    mv = src.read_pages(t, vpns)
    assert len(mv) == len(idx) * PAGE
    for k, i in enumerate(idx):
        assert bytes(mv[k * PAGE : (k + 1) * PAGE]) == bytes([pattern[i]]) * PAGE
    assert src.last_missing.tolist() == []


def test_a_fully_anonymous_vma_skips_the_pagemap_walk_with_the_same_answer(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    """After mappings(), a VMA smaps counts as all anonymous is listed without reading
    pagemap (once); the answer is the pagemap walk's.  A VMA with a zero-page page or a
    hole is walked."""
    full = spawn_mem_child([1, 2, 3, 4])
    holes = spawn_mem_child([5, 6], zero=1, untouched=1)
    shortcuts = 0
    for c in (full, holes):
        t = _tid(c.pid)
        v0 = c.vpn("private")
        vma = next(m for m in src.mappings(t) if m.start_vpn <= v0 < m.end_vpn)
        reads: list[object] = []
        real = src._read_pagemap

        def counting(*a: object, reads: list[object] = reads, real: object = real) -> object:
            reads.append(a)
            return real(*a)  # type: ignore[operator]

        src._read_pagemap = counting  # type: ignore[assignment,method-assign]
        try:
            first = src.present_anon(t, vma.start_vpn, vma.end_vpn)
            walked = len(reads)
            second = src.present_anon(t, vma.start_vpn, vma.end_vpn)  # no shortcut left
        finally:
            src._read_pagemap = real  # type: ignore[method-assign]
        assert first.tolist() == second.tolist()
        assert len(reads) == walked + 1
        shortcuts += walked == 0
        if c is full:
            assert vma.anon_pages == vma.npages and walked == 0, vma
        else:
            assert vma.anon_pages < vma.npages and walked == 1
            assert [v0, v0 + 1] == [v for v in first.tolist() if v0 <= v < v0 + 4]
    assert shortcuts == 1


def test_a_read_into_a_callers_buffer_leaves_the_last_read_alone(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    """read_pages(..., out) writes only `out`: the merger reads unstable tree partners
    so while the scanner's chunk stays where it was read."""
    a, b = spawn_mem_child([0x10, 0x11]), spawn_mem_child([0xEE] * 2)
    ta, tb = _tid(a.pid), _tid(b.pid)
    chunk = memoryview(bytearray(2 * PAGE))
    first = src.read_pages(ta, np.array([a.vpn("private"), a.vpn("private") + 1], dtype=np.uint64), chunk)
    own = memoryview(bytearray(2 * PAGE))
    theirs = src.read_pages(tb, np.array([b.vpn("private"), b.vpn("private") + 1], dtype=np.uint64), own)
    assert bytes(theirs) == bytes([0xEE]) * 2 * PAGE and theirs.obj is own.obj
    assert bytes(first) == bytes([0x10]) * PAGE + bytes([0x11]) * PAGE and first.obj is chunk.obj
    plain = src.read_pages(ta, np.array([a.vpn("private")], dtype=np.uint64))
    assert bytes(plain) == bytes([0x10]) * PAGE and bytes(first[:PAGE]) == bytes([0x10]) * PAGE


def test_pid_reuse_and_dead_child_give_process_gone(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    c = spawn_mem_child([1, 2])
    t = _tid(c.pid)
    with pytest.raises(ProcessGone):  # same pid, another start time: another process
        src.stat(TaskId(t.pid, t.start_time + 1))
    # open fds on it first, then let it die and be reaped
    assert len(src.present_anon(t, c.vpn("private"), c.vpn("private") + 2)) == 2
    c.close()
    vpns = np.array([c.vpn("private")], dtype=np.uint64)
    with pytest.raises(ProcessGone):
        src.read_pages(t, vpns)
    with pytest.raises(ProcessGone):
        src.present_anon(t, c.vpn("private"), c.vpn("private") + 2)
    with pytest.raises(ProcessGone):
        src.mappings(t)
    with pytest.raises(ProcessGone):
        src.stat(t)
    assert src.open_tasks() == 0


def test_zombie_gives_process_gone(src: ProcfsSource, spawn_mem_child: SpawnFn, live: Any) -> None:
    c = spawn_mem_child([1])
    t = _tid(c.pid)
    src.present_anon(t, c.vpn("private"), c.vpn("private") + 1)
    c.proc.kill()  # not reaped: a zombie with no mm
    live.wait_until(
        lambda: state(c.pid) in ("", "Z")
    )
    with pytest.raises(ProcessGone):
        src.read_pages(t, np.array([c.vpn("private")], dtype=np.uint64))


def test_child_exiting_mid_read_gives_process_gone(
    src: ProcfsSource, spawn_mem_child: SpawnFn
) -> None:
    n = 4096  # 16 MiB: many reads, so the kill lands while we are reading
    c = spawn_mem_child([i % 200 + 1 for i in range(n)])
    t = _tid(c.pid)
    vpns = src.present_anon(t, c.vpn("private"), c.vpn("private") + n)
    assert len(vpns) == n
    started = threading.Event()

    def killer() -> None:
        started.wait(5)
        c.proc.kill()

    th = threading.Thread(target=killer)
    th.start()
    outcome: BaseException | None = None
    try:
        for _ in range(100_000):
            src.read_pages(t, vpns)
            started.set()
    except BaseException as e:  # noqa: BLE001 - we assert on the type below
        outcome = e
    finally:
        started.set()
        th.join()
    assert isinstance(outcome, ProcessGone)


def test_fds_back_to_baseline_after_release_and_close(spawn_mem_child: SpawnFn, live: Any) -> None:
    kids = [spawn_mem_child([1, 2, 3]) for _ in range(3)]
    base = live.open_fd_count()
    s = ProcfsSource(max_open_tasks=8)
    try:
        for c in kids:
            t = _tid(c.pid)
            v = s.present_anon(t, c.vpn("private"), c.vpn("private") + 3)
            s.read_pages(t, v)
        assert s.open_tasks() == 3
        # per task: /proc/PID dir, pagemap, mem; kpageflags is not needed: every page
        # here is an exclusively mapped anonymous page
        assert not s.kpageflags_open
        assert live.open_fd_count() == base + 3 * 3
        s.release(_tid(kids[0].pid))
        assert live.open_fd_count() == base + 2 * 3
    finally:
        s.close()
    assert live.open_fd_count() == base


def test_fd_cache_is_bounded(spawn_mem_child: SpawnFn, live: Any) -> None:
    kids = [spawn_mem_child([1]) for _ in range(4)]
    base = live.open_fd_count()
    s = ProcfsSource(max_open_tasks=2)
    try:
        for c in kids:
            s.read_pages(_tid(c.pid), np.array([c.vpn("private")], dtype=np.uint64))
        assert s.open_tasks() == 2
        assert live.open_fd_count() == base + 2 * 2  # dir + mem each; kpageflags never opened
    finally:
        s.close()
    assert live.open_fd_count() == base


def test_scope_by_pid_comm_and_cgroup(
    spawn_mem_child: SpawnFn, v2_cgroup: CgroupFactory, live: Any
) -> None:
    a = spawn_mem_child([1], comm="lksmfs-a")
    b = spawn_mem_child([1], comm="lksmfs-b")
    s = ProcfsSource(scope=Scope(pids={a.pid}))
    assert [t.pid for t in s.tasks()] == [a.pid]
    s = ProcfsSource(scope=Scope(exclude_comms={"lksmfs-a"}))
    pids = {t.pid for t in s.tasks()}
    assert b.pid in pids and a.pid not in pids
    g = v2_cgroup()
    live.move_to_cgroup(g, b.pid)
    s = ProcfsSource(scope=Scope(cgroups=[g]))
    assert [t.pid for t in s.tasks()] == [b.pid]
    assert s.in_scope(b.pid) and not s.in_scope(a.pid)
