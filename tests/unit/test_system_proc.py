"""/proc task facts (lksmfs.system.proc) on handcrafted text and a fake /proc tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lksmfs.system.proc import (
    PF_KTHREAD,
    AccessDenied,
    ProcessGone,
    TaskDir,
    TaskId,
    as_task_error,
    parse_stat,
    read_comm,
    read_stat,
    rss_anon_pages,
    runtime_ns,
    state,
    task_id,
    try_stat,
    wrap_exceptions,
)


def _stat(pid: int, comm: bytes, *, state: bytes = b"S", flags: int = 0x400100) -> bytes:
    # fields 4..8, 9 flags, 10 minflt, 11 cminflt, 12 majflt, 13 cmajflt, 14 utime,
    # 15 stime, 16..21, 22 starttime, then a few more
    return b"%d (%s) %s 1 2 3 0 -1 %d 11 99 7 98 300 200 0 0 20 0 1 0 123456 1000 50 rest\n" % (pid, comm, state, flags)


def test_stat_with_spaces_and_parens_in_comm() -> None:
    st = parse_stat(_stat(4242, b"a) (b c) x"))
    assert st.pid == 4242
    assert st.comm == "a) (b c) x"
    assert st.state == "S"
    assert st.flags == 0x400100
    assert (st.minflt, st.majflt) == (11, 7)
    assert (st.utime, st.stime) == (300, 200)
    assert st.starttime == 123456
    assert not st.kthread


def test_stat_kthread_flag() -> None:
    st = parse_stat(_stat(2, b"kthreadd", flags=PF_KTHREAD | 0x40))
    assert st.kthread


def test_stat_non_utf8_comm_survives() -> None:
    st = parse_stat(_stat(9, b"\xff\xfeodd"))
    assert os.fsencode(st.comm) == b"\xff\xfeodd"


@pytest.mark.parametrize("bad", [b"", b"12 noparens S 1", b"12 (x) S 1 2"])
def test_stat_malformed_raises_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_stat(bad)


def test_errno_mapping() -> None:
    conv = as_task_error
    assert isinstance(conv(OSError(errno.ESRCH, "x"), "t"), ProcessGone)
    assert isinstance(conv(OSError(errno.ENOENT, "x"), "t"), ProcessGone)
    assert isinstance(conv(OSError(errno.EACCES, "x"), "t"), AccessDenied)
    assert isinstance(conv(OSError(errno.EPERM, "x"), "t"), AccessDenied)
    other = OSError(errno.EINVAL, "x")
    assert conv(other, "t") is other


def test_esrch_is_gone_even_from_a_live_task() -> None:
    """ESRCH from a mem fd of a task that exec'd since: the task lives, its old mm is gone."""
    assert isinstance(as_task_error(OSError(errno.ESRCH, "x"), "t", lambda: True), ProcessGone)
    enoent = OSError(errno.ENOENT, "x")
    assert as_task_error(enoent, "t", lambda: True) is enoent  # alive: a file this kernel lacks
    assert isinstance(as_task_error(enoent, "t", lambda: False), ProcessGone)


def test_eio_alone_is_not_gone() -> None:
    eio = OSError(errno.EIO, "Input/output error")
    assert as_task_error(eio, "t") is eio  # maybe a page unmapped meanwhile: the caller asks alive()


def test_wrap_exceptions_names_the_file_and_keeps_the_cause() -> None:
    with pytest.raises(ProcessGone, match=r"^7@1 stat: \[Errno 2\] ENOENT No such") as ei:
        with wrap_exceptions("7@1 stat"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    with pytest.raises(AccessDenied), wrap_exceptions("x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(OSError) as other, wrap_exceptions("x"):
        raise OSError(errno.EINVAL, "Invalid argument")
    assert other.value.errno == errno.EINVAL


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A fake /proc: pid 10 (comm with a space and a parenthesis), a zombie 11."""
    root = tmp_path / "proc"
    d = root / "10"
    d.mkdir(parents=True)
    (d / "stat").write_bytes(_stat(10, b"we(ird) name"))
    (d / "schedstat").write_text("150000000 2000 3\n")
    (d / "status").write_text("Name:\tx\nRssFile:\t 8 kB\nRssAnon:\t   40 kB\n")
    (d / "comm").write_text("we(ird) name\n")
    z = root / "11"
    z.mkdir()
    (z / "stat").write_bytes(_stat(11, b"z", state=b"Z"))
    return root


def test_facts_by_pid(proc: Path) -> None:
    root = str(proc)
    assert read_stat(10, root).comm == "we(ird) name"
    assert task_id(10, root) == TaskId(10, 123456)  # field 22
    assert runtime_ns(10, root) == 150_000_000
    assert rss_anon_pages(10, root) == 10  # 40 kB
    assert read_comm(10, root) == "we(ird) name"
    assert (state(10, root), state(11, root), state(99, root)) == ("S", "Z", "")
    assert try_stat(99, root) is None and read_comm(99, root) is None
    with pytest.raises(ProcessGone, match="99 stat"):
        task_id(99, root)
    (proc / "12").mkdir()
    (proc / "12" / "stat").write_bytes(b"")  # a task reaped while it was read
    with pytest.raises(ProcessGone, match="empty"):
        read_stat(12, root)


def test_task_dir_pins_identity(proc: Path) -> None:
    root = str(proc)
    with pytest.raises(ProcessGone, match="pid reused"):
        TaskDir.open(TaskId(10, 1), root)
    d, st = TaskDir.open(TaskId(10, 123456), root)
    try:
        assert st.comm == "we(ird) name" and d.alive()
        assert d.runtime_ns(st) == 150_000_000 and d.rss_anon_pages() == 10
        (proc / "10" / "schedstat").unlink()  # CONFIG_SCHED_INFO=n: utime+stime ticks
        assert d.runtime_ns(st) == (300 + 200) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        with pytest.raises(FileNotFoundError):  # alive: a file this kernel lacks is the caller's
            d.read("maps")
        (proc / "10" / "stat").write_bytes(_stat(10, b"we(ird) name", state=b"Z"))
        with pytest.raises(ProcessGone, match=r"10@123456 maps: \[Errno 2\] ENOENT"):
            d.read("maps")  # the same error from a zombie: it is going
    finally:
        d.close()
    z, _ = TaskDir.open(TaskId(11, 123456), root)
    assert not z.alive()  # a zombie has no mm left
    z.close()
