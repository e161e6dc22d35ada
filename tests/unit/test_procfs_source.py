"""ProcfsSource on a fake /proc tree: the rules, with every expected value worked by hand."""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lksmfs.sources import procfs as procfs_mod
from lksmfs.sources.base import PAGE_SIZE, ProcessGone, TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.system.proc import PF_KTHREAD

PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE_OR_SHARED = 1 << 61
EXCLUSIVE = 1 << 56
KPF_ANON = 1 << 12
KPF_KSM = 1 << 21
KPF_ZERO = 1 << 24


class FakeProc:
    """Writes just enough of /proc for ProcfsSource under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def task(
        self,
        pid: int,
        comm: str = "app",
        *,
        start: int = 1000,
        state: str = "S",
        flags: int = 0x400000,
        minflt: int = 0,
        majflt: int = 0,
        utime: int = 0,
        stime: int = 0,
        rss_anon_kb: int | None = 0,
        schedstat: str | None = "0 0 0",
        smaps: str = "",
    ) -> TaskId:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(
            f"{pid} ({comm}) {state} 1 1 1 0 -1 {flags} {minflt} 0 {majflt} 0 {utime} {stime}"
            f" 0 0 20 0 1 0 {start} 4096 1 end\n"
        )
        status = f"Name:\t{comm}\nRssFile:\t  100 kB\n"
        if rss_anon_kb is not None:
            status += f"RssAnon:\t{rss_anon_kb} kB\n"
        (d / "status").write_text(status)
        if schedstat is not None:
            (d / "schedstat").write_text(schedstat + "\n")
        (d / "smaps").write_text(smaps)
        maps = "\n".join(ln for ln in smaps.splitlines() if ln and not ln.split()[0].endswith(":"))
        (d / "maps").write_text(maps + "\n" if maps else "")
        (d / "pagemap").write_bytes(b"")
        (d / "mem").write_bytes(b"")
        return TaskId(pid, start)

    def pagemap(self, pid: int, vpn: int, entries: list[int]) -> None:
        with open(self.root / str(pid) / "pagemap", "r+b") as f:
            f.seek(vpn * 8)
            f.write(struct.pack(f"<{len(entries)}Q", *entries))

    def mem(self, pid: int, vpn: int, data: bytes) -> None:
        with open(self.root / str(pid) / "mem", "r+b") as f:
            f.seek(vpn * PAGE_SIZE)
            f.write(data)

    def kpageflags(self, flags: dict[int, int], npfn: int) -> None:
        arr = np.zeros(npfn, dtype=np.uint64)
        for pfn, f in flags.items():
            arr[pfn] = f
        (self.root / "kpageflags").write_bytes(arr.tobytes())


def _smaps(lines: list[tuple[str, int, str]]) -> str:
    return "".join(f"{h}\nAnonymous: {a} kB\nVmFlags: {v}\n" for h, a, v in lines)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def _src(fake: FakeProc, **kw: object) -> ProcfsSource:
    return ProcfsSource(str(fake.root), self_pid=kw.pop("self_pid", 999), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tasks


def test_tasks_skip_kthreads_self_and_vanished(fake: FakeProc) -> None:
    fake.task(1, "init", start=5)
    fake.task(2, "kthreadd", start=6, flags=PF_KTHREAD | 0x40)
    fake.task(100, "app", start=700)
    fake.task(999, "lksmfsd", start=800)  # the daemon itself
    (fake.root / "555").mkdir()  # exited between readdir and reading its stat
    (fake.root / "self").mkdir()
    with _src(fake) as s:
        assert s.tasks() == [TaskId(1, 5), TaskId(100, 700)]


def test_tasks_apply_scope(fake: FakeProc) -> None:
    fake.task(1, "init", start=5)
    fake.task(100, "app", start=700)
    fake.task(101, "noisy", start=701)
    with _src(fake, scope=Scope(pids={100, 101})) as s:
        assert [t.pid for t in s.tasks()] == [100, 101]
        assert s.in_scope(100) and not s.in_scope(1)
    with _src(fake, scope=Scope(exclude_comms={"noisy"})) as s:
        assert [t.pid for t in s.tasks()] == [1, 100]


# ------------------------------------------------------------------------------- stat


def test_stat_fields(fake: FakeProc) -> None:
    t = fake.task(100, "my app", minflt=40, majflt=2, rss_anon_kb=4100, schedstat="123456789 55 3")
    with _src(fake) as s:
        st = s.stat(t)
    assert st.comm == "my app"
    assert st.runtime_ns == 123456789
    assert st.faults == 42
    assert st.anon_pages == 1025  # 4100 kB / 4 kB
    assert not st.kthread


def test_stat_without_schedstat_uses_cpu_ticks(fake: FakeProc) -> None:
    t = fake.task(100, utime=30, stime=20, schedstat=None, rss_anon_kb=None)
    tck = os.sysconf("SC_CLK_TCK")
    with _src(fake) as s:
        st = s.stat(t)
    assert st.runtime_ns == 50 * 1_000_000_000 // tck
    assert st.anon_pages == 0


def test_start_time_mismatch_is_process_gone(fake: FakeProc) -> None:
    fake.task(100, start=700)
    with _src(fake) as s:
        for call in (
            lambda: s.stat(TaskId(100, 699)),
            lambda: s.mappings(TaskId(100, 699)),
            lambda: s.present_anon(TaskId(100, 699), 0, 4),
            lambda: s.read_pages(TaskId(100, 699), np.array([1], dtype=np.uint64)),
        ):
            with pytest.raises(ProcessGone):
                call()
        with pytest.raises(ProcessGone):
            s.stat(TaskId(12345, 1))  # no such pid at all
        assert s.open_tasks() == 0


# --------------------------------------------------------------------------- mappings


def test_mappings_from_smaps(fake: FakeProc) -> None:
    t = fake.task(
        100,
        smaps=_smaps(
            [
                ("00400000-00401000 r-xp 00000000 08:01 33 /bin/app", 0, "rd ex mr mw me"),
                ("00601000-00602000 rw-p 00001000 08:01 33 /bin/app", 4, "rd wr mr mw me ac"),
                ("00602000-00604000 rw-p 00000000 00:00 0", 0, "rd wr mr mw me ac"),
                ("7f0000000000-7f0000004000 rw-s 00000000 00:01 9 /dev/shm/q", 16, "rd wr sh"),
                ("7f0000004000-7f0000005000 rw-p 00000000 00:00 0", 4, "rd wr mr mw me io"),
            ]
        ),
    )
    with _src(fake) as s:
        text, data, bss, shm, io = s.mappings(t)
    assert text.file == (os.makedev(8, 1), 33) and text.is_exec
    assert data.has_anon and data.mergeable
    assert not bss.has_anon and bss.mergeable and bss.npages == 2
    assert not shm.mergeable
    assert not io.mergeable and io.has_anon


def test_mappings_fall_back_to_maps_without_smaps(fake: FakeProc) -> None:
    t = fake.task(100, smaps=_smaps([("00602000-00604000 rw-p 00000000 00:00 0", 0, "rd")]))
    (fake.root / "100" / "smaps").unlink()
    with _src(fake) as s:
        (m,) = s.mappings(t)
    assert (m.start, m.end, m.has_anon) == (0x602000, 0x604000, True)


# ----------------------------------------------------------------------- present_anon

V0 = 0x400


def _entry(pfn: int, *extra: int) -> int:
    e = PRESENT | pfn
    for x in extra:
        e |= x
    return e


def test_present_anon_pagemap_and_kpageflags(fake: FakeProc) -> None:
    t = fake.task(100)
    fake.pagemap(
        100,
        V0,
        [
            _entry(5),  # +0 anon page: kept
            0,  # +1 not present
            _entry(6, FILE_OR_SHARED),  # +2 page cache page
            _entry(7),  # +3 the shared zero page
            _entry(1000),  # +4 anon, far away PFN: kept
            _entry(5),  # +5 same anon (KSM) page mapped again: kept
            _entry(1_000_000),  # +6 PFN beyond kpageflags (device memory): no flags
            SWAPPED | 1234,  # +7 swapped out: not present
            _entry(8),  # +8 anon: kept
        ],
    )
    fake.kpageflags({5: KPF_ANON | KPF_KSM, 6: 0, 7: KPF_ZERO, 8: KPF_ANON, 1000: KPF_ANON}, npfn=1100)
    with _src(fake) as s:
        got = s.present_anon(t, V0, V0 + 9)
        assert got.dtype == np.uint64
        assert got.tolist() == [V0 + 0, V0 + 4, V0 + 5, V0 + 8]
        # sub-ranges and the empty range
        assert s.present_anon(t, V0 + 1, V0 + 5).tolist() == [V0 + 4]
        assert s.present_anon(t, V0 + 5, V0 + 5).tolist() == []
        # beyond the end of the pagemap file: nothing present, no error
        assert s.present_anon(t, V0 + 100, V0 + 200).tolist() == []
        assert not s.fallback_used


def test_present_anon_over_many_pagemap_reads_keeps_address_order(
    fake: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages come out in address order however the range is read (4 entries a read
    here) and however little room was reserved at first (3 pages: it grows)."""
    monkeypatch.setattr(procfs_mod, "_PAGEMAP_CHUNK", 4)
    monkeypatch.setattr(procfs_mod, "_ROOM_AT_ONCE", 3)
    t = fake.task(100)
    # every third page absent, the others alternately exclusive (no lookup) and shared
    entries = [0 if i % 3 == 2 else _entry(10 + i, EXCLUSIVE) if i % 2 else _entry(10 + i) for i in range(22)]
    fake.pagemap(100, V0, entries)
    fake.kpageflags({10 + i: KPF_ANON for i in range(22)} | {10 + 4: KPF_ZERO}, npfn=64)
    with _src(fake) as s:
        got = s.present_anon(t, V0, V0 + 22)
    want = [V0 + i for i in range(22) if i % 3 != 2 and i != 4]
    assert got.tolist() == want


def test_exclusive_anon_pages_need_no_kpageflags(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exclusively mapped and not PM_FILE: anonymous without asking kpageflags; only the
    shared mappings (a KSM page, the zero page) are looked up."""
    t = fake.task(100)
    fake.pagemap(
        100,
        V0,
        [
            _entry(50, EXCLUSIVE),  # +0 anon, mapped once: kept, no lookup
            _entry(60, EXCLUSIVE, FILE_OR_SHARED),  # +1 a page cache page mapped once: not anon
            _entry(7),  # +2 the zero page (never exclusive): looked up, dropped
            _entry(5),  # +3 a KSM page (shared): looked up, kept
            _entry(51, EXCLUSIVE),  # +4 anon: kept
        ],
    )
    # kpageflags deliberately calls 50 and 51 file pages: they must not be consulted
    fake.kpageflags({5: KPF_ANON | KPF_KSM, 7: KPF_ZERO, 50: 0, 51: 0}, npfn=100)
    looked: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        looked.append(fd)
        return real(fd, n, off)

    with _src(fake) as s:
        monkeypatch.setattr(os, "pread", counting)
        got = s.present_anon(t, V0, V0 + 5)
        kfd = s._kpf_fd
    assert got.tolist() == [V0 + 0, V0 + 3, V0 + 4]
    assert looked.count(kfd) == 1  # PFNs 5 and 7 in one read


def test_kpageflags_reads_are_grouped(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    t = fake.task(100)
    # PFNs 10..13 and 20 are one cluster (gaps < 64), 5000 is another
    pfns = [10, 11, 12, 13, 20, 5000, 11]
    fake.pagemap(100, V0, [_entry(p) for p in pfns])
    fake.kpageflags({p: KPF_ANON for p in pfns}, npfn=6000)
    calls: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        calls.append(fd)
        return real(fd, n, off)

    with _src(fake) as s:
        monkeypatch.setattr(os, "pread", counting)
        got = s.present_anon(t, V0, V0 + len(pfns))
        kfd = s._kpf_fd
    assert got.tolist() == [V0 + i for i in range(len(pfns))]
    assert calls.count(kfd) == 2
    assert len(calls) == 3  # one pagemap read + two kpageflags reads


def test_fallback_without_kpageflags(fake: FakeProc, caplog: pytest.LogCaptureFixture) -> None:
    t = fake.task(100)
    fake.pagemap(100, V0, [_entry(5), _entry(6, FILE_OR_SHARED), 0, _entry(7)])
    # no kpageflags file: present and not file/shared-anon counts as anonymous, which
    # includes the zero page at +3 (the documented over-count)
    with caplog.at_level(logging.WARNING, logger="lksmfs.procfs"):
        with _src(fake) as s:
            assert s.present_anon(t, V0, V0 + 4).tolist() == [V0, V0 + 3]
            assert s.present_anon(t, V0, V0 + 4).tolist() == [V0, V0 + 3]
            assert s.fallback_used
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_fallback_when_pfns_are_hidden(fake: FakeProc, caplog: pytest.LogCaptureFixture) -> None:
    t = fake.task(100)
    # without CAP_SYS_ADMIN the kernel zeroes the PFN field but keeps the flag bits
    fake.pagemap(100, V0, [PRESENT, PRESENT | FILE_OR_SHARED, PRESENT])
    fake.kpageflags({0: KPF_ZERO}, npfn=16)  # must not be consulted for PFN 0
    with caplog.at_level(logging.WARNING, logger="lksmfs.procfs"):
        with _src(fake) as s:
            assert s.present_anon(t, V0, V0 + 3).tolist() == [V0, V0 + 2]
    assert any("page frame numbers" in r.getMessage() for r in caplog.records)


def test_present_anon_chunks_large_ranges(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    t = fake.task(100)
    monkeypatch.setattr(procfs_mod, "_PAGEMAP_CHUNK", 4)
    fake.pagemap(100, V0, [_entry(1 + i) for i in range(10)])
    fake.kpageflags({1 + i: KPF_ANON for i in range(10) if i % 3 == 0}, npfn=32)
    with _src(fake) as s:
        assert s.present_anon(t, V0, V0 + 10).tolist() == [V0, V0 + 3, V0 + 6, V0 + 9]


# ------------------------------------------------------------------------- read_pages


def _page(b: int) -> bytes:
    return bytes([b]) * PAGE_SIZE


def test_read_pages_coalesces_runs(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    t = fake.task(100, smaps=_smaps([("00400000-00420000 rw-p 00000000 00:00 0", 128, "rd wr")]))
    for i in range(0x20):
        fake.mem(100, V0 + i, _page(i + 1))
    vpns = [V0 + 0, V0 + 1, V0 + 2, V0 + 0x10, V0 + 0x11, V0 + 5]
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, bufs: list[memoryview], off: int) -> int:
        calls.append(off)
        return real(fd, bufs, off)

    with _src(fake) as s:
        monkeypatch.setattr(os, "preadv", counting)
        mv = s.read_pages(t, np.array(vpns, dtype=np.uint64))
        assert len(mv) == 6 * PAGE_SIZE
        for k, v in enumerate(vpns):
            assert bytes(mv[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]) == _page(v - V0 + 1)
        # three runs: [0,1,2], [0x10,0x11], [5]
        assert calls == [V0 * PAGE_SIZE, (V0 + 0x10) * PAGE_SIZE, (V0 + 5) * PAGE_SIZE]
        assert s.last_missing.tolist() == []
        assert len(s.read_pages(t, np.zeros(0, dtype=np.uint64))) == 0


def test_read_pages_buffer_grows_while_old_view_alive(fake: FakeProc) -> None:
    t = fake.task(100, smaps=_smaps([("00400000-00600000 rw-p 00000000 00:00 0", 4, "rd")]))
    fake.mem(100, V0, _page(7) * 100)
    with _src(fake) as s:
        small = s.read_pages(t, np.array([V0], dtype=np.uint64))
        big = s.read_pages(t, np.arange(V0, V0 + 100, dtype=np.uint64))
        assert bytes(big) == _page(7) * 100
        assert len(small) == PAGE_SIZE


def test_read_pages_zero_fills_unmapped_pages(fake: FakeProc) -> None:
    # mem ends after 2 pages; 0x402 is no longer in maps, 0x410 still is (but unreadable)
    t = fake.task(
        100,
        smaps=_smaps(
            [
                ("00400000-00402000 rw-p 00000000 00:00 0", 8, "rd wr"),
                ("00410000-00411000 rw-p 00000000 00:00 0", 4, "rd wr"),
            ]
        ),
    )
    fake.mem(100, V0, _page(1) + _page(2))
    with _src(fake) as s:
        mv = s.read_pages(t, np.array([V0, V0 + 1, V0 + 2, V0 + 0x10], dtype=np.uint64))
        assert bytes(mv) == _page(1) + _page(2) + bytes(2 * PAGE_SIZE)
        assert s.last_missing.tolist() == [V0 + 2, V0 + 0x10]


def test_read_pages_of_vanished_task_is_process_gone(fake: FakeProc) -> None:
    t = fake.task(100, smaps=_smaps([("00400000-00402000 rw-p 00000000 00:00 0", 8, "rd")]))
    fake.mem(100, V0, _page(1))
    with _src(fake) as s:
        s.read_pages(t, np.array([V0], dtype=np.uint64))  # fds are now cached
        assert s.open_tasks() == 1
        shutil.rmtree(fake.root / "100")
        with pytest.raises(ProcessGone):
            s.read_pages(t, np.array([V0 + 1], dtype=np.uint64))
        assert s.open_tasks() == 0


def test_read_pages_of_zombie_is_process_gone(fake: FakeProc) -> None:
    t = fake.task(100, smaps=_smaps([("00400000-00402000 rw-p 00000000 00:00 0", 8, "rd")]))
    s = _src(fake)
    try:
        s.read_pages(t, np.array([V0], dtype=np.uint64))  # EOF: zero-filled, task alive
        fake.task(100, state="Z", smaps="")
        with pytest.raises(ProcessGone):
            s.read_pages(t, np.array([V0], dtype=np.uint64))
    finally:
        s.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_cache_bounded_and_closed(fake: FakeProc) -> None:
    tasks = [fake.task(100 + i, start=10 + i) for i in range(5)]
    for t in tasks:
        fake.mem(t.pid, V0, _page(t.pid % 256))
    base = _fds()
    s = _src(fake, max_open_tasks=3)
    try:
        for t in tasks:
            assert bytes(s.read_pages(t, np.array([V0], dtype=np.uint64))) == _page(t.pid % 256)
        assert s.open_tasks() == 3
        assert _fds() == base + 3 * 2  # dir + mem for the 3 most recent
        s.release(tasks[-1])
        assert s.open_tasks() == 2 and _fds() == base + 2 * 2
        s.release(tasks[-1])  # twice is harmless
        s.stat(tasks[0])  # stat does not pin fds
        assert _fds() == base + 2 * 2
    finally:
        s.close()
    assert _fds() == base and s.open_tasks() == 0


def test_fallback_when_kpageflags_read_fails(fake: FakeProc) -> None:
    t = fake.task(100)
    fake.pagemap(100, V0, [_entry(5), _entry(6, FILE_OR_SHARED)])
    (fake.root / "kpageflags").mkdir()  # opens, but every read fails (EISDIR)
    with _src(fake) as s:
        assert s.present_anon(t, V0, V0 + 2).tolist() == [V0]
        assert s.fallback_used
