"""ProcfsSource reads pages with process_vm_readv(2), or /proc/PID/mem where the call is
refused: the same bytes either way, the same zero-filled pages where nothing can be read,
the same ProcessGone for a task that exited (real processes, root)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import lksmfs.sources.procfs as procfs
from lksmfs.engine.pages import digest_pages
from lksmfs.sources.base import PAGE_SHIFT, PAGE_SIZE, ProcessGone
from lksmfs.sources.procfs import ProcfsSource, process_vm_read
from testkit.memproc import MemProcess
from testkit.patterns import Region

pytestmark = pytest.mark.live

# the pattern region: byte values, a page unique to this process, zero-filled pages, and
# pages only read (the shared zero page: present, not anonymous) or never touched
PATTERN = [(3, 0x41), (2, "unique"), (2, "zero"), (1, 0x7F), (2, "read"), (2, "untouched"), (4, 0x42)]


@pytest.fixture
def child(live: Any) -> Iterator[MemProcess]:
    with MemProcess(Region("data", PATTERN), stop=True) as p:
        yield p


def _expected(child: MemProcess) -> bytes:
    """The region's pages as the child wrote them (unique pages read back by hand)."""
    out = b""
    at = child.addr("data")
    with open(f"/proc/{child.pid}/mem", "rb", buffering=0) as mem:
        for count, pattern in PATTERN:
            if pattern == "unique":
                out += os.pread(mem.fileno(), count * PAGE_SIZE, at)
            elif pattern in ("zero", "read", "untouched"):
                out += bytes(count * PAGE_SIZE)
            else:
                assert isinstance(pattern, int)
                out += bytes([pattern]) * (count * PAGE_SIZE)
            at += count * PAGE_SIZE
    return out


def _read(child: MemProcess, vpns: np.ndarray, *, vm_read: bool,
          monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, list[int], int]:
    """(bytes, last_missing, preads) of one read_pages of `vpns` with or without the call."""
    preads = [0]
    real = os.preadv

    def counting(fd: int, bufs: Any, offset: int) -> int:
        preads[0] += 1
        return real(fd, bufs, offset)

    with monkeypatch.context() as m, ProcfsSource() as src:
        m.setattr(procfs.os, "preadv", counting)
        src.vm_read = vm_read
        data = bytes(src.read_pages(child.task, vpns))
        return data, src.last_missing.tolist(), preads[0]


def test_both_paths_read_the_same_bytes(child: MemProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    n = child.npages("data")
    vpns = np.arange(child.vpn("data"), child.vpn("data") + n, dtype=np.uint64)
    by_call, missing_call, preads_call = _read(child, vpns, vm_read=True, monkeypatch=monkeypatch)
    by_file, missing_file, preads_file = _read(child, vpns, vm_read=False, monkeypatch=monkeypatch)
    assert by_call == by_file == _expected(child)
    assert missing_call == missing_file == []
    assert preads_call == 0 and preads_file == 1  # one run of consecutive pages: one read
    lo_c, hi_c = digest_pages(by_call, n)
    lo_f, hi_f = digest_pages(by_file, n)
    assert (lo_c == lo_f).all() and (hi_c == hi_f).all()


def test_pages_nothing_can_read_are_zero_filled_alike(child: MemProcess,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The PROT_NONE guard page before the region (readable only with the file's
    FOLL_FORCE: zeros), the region, and a page in no mapping at all (read as zeros and
    reported missing): what the file gives, the call gives."""
    first = child.vpn("data")
    nowhere = 1 << (47 - PAGE_SHIFT - 1)  # far from any mapping of a small child
    vpns = np.array([first - 1, first, first + 1, nowhere], dtype=np.uint64)
    by_call, missing_call, _ = _read(child, vpns, vm_read=True, monkeypatch=monkeypatch)
    by_file, missing_file, _ = _read(child, vpns, vm_read=False, monkeypatch=monkeypatch)
    assert by_call == by_file
    assert by_call[PAGE_SIZE:3 * PAGE_SIZE] == bytes([0x41]) * (2 * PAGE_SIZE)
    assert by_call[3 * PAGE_SIZE:] == bytes(PAGE_SIZE)
    assert missing_call == missing_file == [nowhere]


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_a_refused_call_falls_back_to_the_file_for_good(child: MemProcess, monkeypatch: pytest.MonkeyPatch,
                                                       err: int) -> None:
    calls = [0]

    def refused(pid: int, buf: memoryview, addr: int) -> int:
        calls[0] += 1
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(procfs, "process_vm_read", refused)
    vpns = np.arange(child.vpn("data"), child.vpn("data") + 3, dtype=np.uint64)
    with ProcfsSource() as src:
        assert src.vm_read
        assert bytes(src.read_pages(child.task, vpns)) == bytes([0x41]) * (3 * PAGE_SIZE)
        assert not src.vm_read
        assert bytes(src.read_pages(child.task, vpns)) == bytes([0x41]) * (3 * PAGE_SIZE)
    assert calls[0] == 1  # asked once, then the file only


@pytest.mark.parametrize("vm_read", [True, False])
def test_a_task_that_exited_is_process_gone_on_both_paths(live: Any, vm_read: bool) -> None:
    with MemProcess(Region("data", [(4, 0x41)]), stop=True) as p, ProcfsSource() as src:
        src.vm_read = vm_read
        vpns = src.present_anon(p.task, p.vpn("data"), p.vpn("data") + 4)
        assert len(vpns) == 4
        task = p.task
        p.close()  # killed and reaped: the pid names no process now
        with pytest.raises(ProcessGone):
            src.read_pages(task, vpns)


def test_process_vm_read_reports_the_kernel_errors(child: MemProcess) -> None:
    """The call itself: a short count stops before an unreadable page; nothing readable
    is EFAULT; no such process is ESRCH."""
    buf = memoryview(bytearray(2 * PAGE_SIZE))
    last = child.addr("data") + (child.npages("data") - 1) * PAGE_SIZE
    assert process_vm_read(child.pid, buf, last) == PAGE_SIZE  # the guard page after the region
    assert bytes(buf[:PAGE_SIZE]) == bytes([0x42]) * PAGE_SIZE
    with pytest.raises(OSError) as e:
        process_vm_read(child.pid, buf, last + PAGE_SIZE)
    assert e.value.errno == errno.EFAULT
    gone = MemProcess(Region("data", [(1, 1)]))
    pid = gone.pid
    gone.close()
    with pytest.raises(OSError) as e:
        process_vm_read(pid, buf, 0x10000)
    assert e.value.errno == errno.ESRCH



def test_reads_by_pid_count_only_if_the_task_was_not_reaped_meanwhile(child: MemProcess,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid names another process once its task is reaped: reads by pid are kept only
    if the task's pinned /proc/PID still answers after them (the file needs no check:
    its fd keeps naming the task it was opened on)."""
    vpns = np.arange(child.vpn("data"), child.vpn("data") + 3, dtype=np.uint64)
    monkeypatch.setattr(procfs._TaskHandle, "still_there", lambda self: False)
    with ProcfsSource() as src:
        with pytest.raises(ProcessGone):
            src.read_pages(child.task, vpns)
        src.vm_read = False
        assert bytes(src.read_pages(child.task, vpns)) == bytes([0x41]) * (3 * PAGE_SIZE)
