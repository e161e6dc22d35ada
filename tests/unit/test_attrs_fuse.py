"""The FUSE adapter's own rules, called directly (no mount): errno mapping, read
snapshots, one write = one store, the hint file's grammar."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace
from typing import Any

import pytest

fuse_mod = pytest.importorskip("lksmfs.sysfs.fuse", exc_type=OSError)  # needs libfuse

from lksmfs.engine.params import Tunables  # noqa: E402
from lksmfs.sources.base import TaskId  # noqa: E402
from lksmfs.sysfs.attrs import AttributeTable  # noqa: E402

LksmOperations = fuse_mod.LksmOperations
parse_hint = fuse_mod.parse_hint


class StandIn:
    """The engine surface the adapter touches; `sharing` is changed by the test."""

    filter_enabled = True
    policy = "lksm"

    def __init__(self) -> None:
        self.tunables = Tunables()
        self.sharing = 5
        self.hints: list[tuple[TaskId, bool]] = []
        self.rows: list[dict[str, Any]] = []
        self.fail = False

    def counters(self) -> dict[str, int]:
        if self.fail:
            raise ValueError("engine bug")
        names = ("pages_shared pages_unshared pages_volatile full_scans stable_node_chains "
                 "stable_node_dups scanning_process nr_regions pages_scanned general_profit "
                 "ksm_zero_pages").split()
        return {"pages_sharing": self.sharing, **dict.fromkeys(names, 0)}

    def region_share(self) -> dict[str, int]:
        return dict.fromkeys(("heap", "stack", "file_data", "file_bss", "conflicted"), 0)

    def set_tunable(self, name: str, value: int) -> None:
        setattr(self.tunables, name, value)

    def set_run(self, flags: int) -> None:
        self.tunables.run = flags

    def request_one_shot(self, mode: int) -> bool:
        return True

    def has_stable_nodes(self) -> bool:
        return False

    def hint(self, task: TaskId, frozen: bool) -> None:
        self.hints.append((task, frozen))

    def per_process(self) -> list[dict[str, Any]]:
        return self.rows


def ops() -> tuple[Any, StandIn]:
    ksm = StandIn()
    o = LksmOperations(
        AttributeTable(ksm),
        resolve_task=lambda pid: TaskId(pid, 99),
        owner_of=lambda pid, start_time: (1000 + pid, 2000 + start_time),
    )
    return o, ksm


def fi(flags: int) -> SimpleNamespace:
    return SimpleNamespace(flags=flags, fh=0, direct_io=0)


def errno_of(call: Any, *args: Any) -> int:
    with pytest.raises(OSError) as ei:
        call(*args)
    return ei.value.errno or 0


def test_read_is_a_snapshot_until_offset_0() -> None:
    o, ksm = ops()
    f = fi(os.O_RDONLY)
    o.open("/pages_sharing", f)
    assert f.direct_io == 1 and f.fh > 0
    ksm.sharing = 12345
    assert o.read("/pages_sharing", 2, 0, f) == b"12"
    ksm.sharing = 99  # changes mid-read: the rest still comes from the same text
    assert o.read("/pages_sharing", 100, 2, f) == b"345\n"
    assert o.read("/pages_sharing", 100, 6, f) == b""
    assert o.read("/pages_sharing", 100, 0, f) == b"99\n"  # a new read from 0 is fresh
    o.release("/pages_sharing", f)
    assert errno_of(o.read, "/pages_sharing", 10, 0, f) == errno.EBADF


def test_unexpected_exception_is_eio() -> None:
    o, ksm = ops()
    f = fi(os.O_RDONLY)
    o.open("/pages_sharing", f)
    ksm.fail = True
    assert errno_of(o.read, "/pages_sharing", 10, 0, f) == errno.EIO
    ksm.fail = False
    assert o.read("/pages_sharing", 10, 0, f) == b"5\n"  # and it keeps serving


def test_write_is_one_store_and_errnos_pass_through() -> None:
    o, ksm = ops()
    f = fi(os.O_WRONLY)
    o.open("/pages_to_scan", f)
    assert o.write("/pages_to_scan", b"300\n", 12345, f) == 4  # offset ignored
    assert ksm.tunables.pages_to_scan == 300
    assert errno_of(o.write, "/pages_to_scan", b"3 00", 0, f) == errno.EINVAL
    assert ksm.tunables.pages_to_scan == 300
    assert o.truncate("/pages_to_scan", 0) == 0


def test_namespace() -> None:
    o, ksm = ops()
    ksm.rows = [
        {"pid": 7, "start_time": 1, "comm": "a", "state": "", "rmap_items": 3,
         "merging_pages": 1, "profit": 4},
        {"pid": 7, "start_time": 2, "comm": "b", "state": "", "rmap_items": 10,
         "merging_pages": 2, "profit": 5},
    ]
    assert {"run", "hint", "proc"} <= set(o.readdir("/", None))
    assert o.readdir("/proc", None) == [".", "..", "7"]
    assert o.getattr("/run")["st_mode"] & 0o777 == 0o644
    assert o.getattr("/pages_sharing")["st_mode"] & 0o777 == 0o444
    st = o.getattr("/proc/7/rmap_items")  # /proc/PID/ksm_stat's mode, the newer slot's owner
    assert (st["st_mode"] & 0o777, st["st_uid"], st["st_gid"]) == (0o400, 1007, 2002)
    st = o.getattr("/proc/7")
    assert (st["st_mode"] & 0o777, st["st_uid"], st["st_gid"]) == (0o555, 1007, 2002)
    assert (o.getattr("/proc")["st_uid"], o.getattr("/run")["st_uid"]) == (0, 0)
    f = fi(os.O_RDONLY)
    o.open("/proc/7/rmap_items", f)
    assert o.read("/proc/7/rmap_items", 100, 0, f) == b"10\n"  # the newer slot of pid 7
    assert errno_of(o.getattr, "/nope") == errno.ENOENT
    assert errno_of(o.getattr, "/proc/8") == errno.ENOENT
    assert errno_of(o.open, "/proc/7/rmap_items", fi(os.O_WRONLY)) == errno.EACCES


def test_ksm_stat_of_a_comm_that_is_not_utf8() -> None:
    """/proc/PID/comm is bytes: an fsdecoded comm goes back out as the same bytes."""
    o, ksm = ops()
    comm = os.fsdecode(b"app\xff\xfe")
    ksm.rows = [{"pid": 9, "start_time": 1, "comm": comm, "state": "listed", "rmap_items": 1,
                 "merging_pages": 0, "profit": -64}]
    f = fi(os.O_RDONLY)
    o.open("/proc/9/ksm_stat", f)
    assert b"comm app\xff\xfe\n" in o.read("/proc/9/ksm_stat", 4096, 0, f)


def test_hint_file() -> None:
    o, ksm = ops()
    assert errno_of(o.open, "/hint", fi(os.O_RDONLY)) == errno.EACCES
    f = fi(os.O_WRONLY)
    o.open("/hint", f)
    assert o.write("/hint", b"42 frozen\n", 0, f) == 10
    assert o.write("/hint", b"42 thawed", 0, f) == 9
    assert ksm.hints == [(TaskId(42, 99), True), (TaskId(42, 99), False)]
    assert errno_of(o.write, "/hint", b"42 frozen\n\n", 0, f) == errno.EINVAL


@pytest.mark.parametrize(
    ("data", "want"),
    [(b"1 frozen", (1, True)), (b"123 thawed\n", (123, False)), (b"0 frozen", None),
     (b"1 FROZEN", None), (b" 1 frozen", None), (b"1 frozen ", None), (b"1\tfrozen", None),
     (b"+1 frozen", None), (b"\xff frozen", None), (b"", None), (b"99999999 frozen", None)],
)
def test_parse_hint(data: bytes, want: tuple[int, bool] | None) -> None:
    if want is None:
        assert errno_of(parse_hint, data) == errno.EINVAL
    else:
        assert parse_hint(data) == want


def test_long_hint_write_is_cut_to_a_page() -> None:
    o, ksm = ops()
    f = fi(os.O_WRONLY)
    o.open("/hint", f)
    assert o.write("/hint", b"42 frozen\n" + b"\0" * 5000, 0, f) == 4096
    assert ksm.hints == [(TaskId(42, 99), True)]


def test_chmod_chown_touch_last_and_open_follows_the_mode() -> None:
    """As kernfs: the change is kept, and open checks the current mode, root included."""
    o, ksm = ops()
    o.chmod("/pages_to_scan", 0o100600)
    o.chown("/pages_to_scan", 65534, -1)
    o.utimens("/pages_to_scan", (1_000_000_000 * 10**9, 2_000_000_000 * 10**9))
    st = o.getattr("/pages_to_scan")
    assert (st["st_mode"], st["st_uid"], st["st_gid"]) == (0o100600, 65534, 0)
    assert (st["st_atime"], st["st_mtime"]) == (10**18, 2 * 10**18)
    o.chmod("/pages_to_scan", 0o444)
    assert errno_of(o.open, "/pages_to_scan", fi(os.O_WRONLY)) == errno.EACCES
    o.chmod("/pages_to_scan", 0o200)
    assert errno_of(o.open, "/pages_to_scan", fi(os.O_RDONLY)) == errno.EACCES
    o.open("/pages_to_scan", fi(os.O_WRONLY))
    # a w bit does not make a read-only attribute or the hint readable/writable
    o.chmod("/pages_sharing", 0o666)
    assert errno_of(o.open, "/pages_sharing", fi(os.O_RDWR)) == errno.EACCES
    o.chmod("/hint", 0o666)
    assert errno_of(o.open, "/hint", fi(os.O_RDONLY)) == errno.EACCES
    assert o.getattr("/run")["st_mode"] & 0o777 == 0o644  # only the changed files


def test_per_process_entries_refuse_chmod_and_chown() -> None:
    o, ksm = ops()
    ksm.rows = [{"pid": 7, "start_time": 1, "comm": "a", "state": "", "rmap_items": 3,
                 "merging_pages": 1, "profit": 4}]
    for path in ("/proc/7", "/proc/7/ksm_stat"):
        assert errno_of(o.chmod, path, 0o644) == errno.EPERM
        assert errno_of(o.chown, path, 0, 0) == errno.EPERM
        assert o.utimens(path, (0, 0)) == 0  # accepted and forgotten, as /proc
        assert o.getattr(path)["st_mtime"] == o.getattr("/run")["st_mtime"]
    assert errno_of(o.chmod, "/proc/8", 0o644) == errno.ENOENT


@pytest.mark.parametrize(
    ("call", "args", "err"),
    [("create", ("/new", 0o644, None), errno.EACCES), ("mkdir", ("/d", 0o755), errno.EPERM),
     ("rmdir", ("/proc",), errno.EPERM), ("unlink", ("/run",), errno.EPERM),
     ("rename", ("/run", "/x"), errno.EPERM), ("symlink", ("/l", "run"), errno.EPERM),
     ("link", ("/l", "/run"), errno.EPERM), ("mknod", ("/p", 0o10644, 0), errno.EPERM)],
)
def test_namespace_changes_are_refused_as_sysfs_does(call: str, args: tuple[Any, ...], err: int) -> None:
    o, _ = ops()
    assert errno_of(getattr(o, call), *args) == err
