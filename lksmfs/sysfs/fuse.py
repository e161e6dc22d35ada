"""A thin FUSE adapter: the AttributeTable as a directory of files.

Every rule of the ABI lives in AttributeTable; this module only maps file system
calls onto it, the way kernfs maps them onto *_show/*_store:

- read: the file's text is generated when a read starts at offset 0 and kept for the
  open file, so a reader that reads in pieces never sees two different values glued
  together (seq_file does the same).  Files are opened direct_io, so the page cache
  never serves a stale value and `cat` always sees the current one.
- write: one write() is one store(); the offset is ignored, as sysfs ignores it.
- truncate: accepted and ignored, because `echo x > file` opens with O_TRUNC.
- chmod/chown/touch, rename/unlink/mkdir/...: what sysfs answers (lksmfs.sysfs.nodes).

lksmfs extensions (not in the kernel's ABI, see docs/fuse.md): a write-only `hint` file
(`PID frozen|thawed`: the freezer hook by hand) and `proc/PID/` with per-process figures.

Any exception in a callback is logged with its traceback and becomes EIO: a bug in one
request must never take the mount down.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar

import mfusepy as fuse

from lksmfs.sysfs.attrs import MAX_WRITE, AttributeEngine, AttributeTable
from lksmfs.sysfs.nodes import ROOT_OWNER, NodeAttrs, check_open, no_create, no_namespace_change, process_owner
from lksmfs.system.proc import PROC_ROOT, AccessDenied, ProcessGone, TaskId, task_id
from lksmfs.system.threads import name_current

log = logging.getLogger(__name__)

HINT = "hint"
PROC = "proc"
# per-process files, in the style of mainline's /proc/PID/ksm_stat
PROC_FILES = ("rmap_items", "merging_pages", "ksm_process_profit", "ksm_stat")
PER_PROCESS_TTL_S = 0.2  # proc/ listings are reused this long: `ls -l` is one getattr per file
SYSFS_SIZE = 4096  # what sysfs reports for every attribute

F = TypeVar("F", bound=Callable[..., Any])


_worker = threading.local()


def _name_worker() -> None:
    """libfuse's worker threads reach Python unnamed ("Dummy-1" in the log, the process's
    comm in `ps -L`): the first callback a thread runs names it "fuse"."""
    _worker.named = True
    if threading.current_thread() is not threading.main_thread():
        name_current("fuse")


def guarded(func: F) -> F:
    """OSError keeps its errno; anything else is a bug: log it, answer EIO, keep serving."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not getattr(_worker, "named", False):
            _name_worker()
        try:
            return func(*args, **kwargs)
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                raise fuse.FuseOSError(e.errno) from None
            log.exception("FUSE %s: OSError without an errno", func.__name__)
            raise fuse.FuseOSError(errno.EIO) from None
        except Exception:
            log.exception("FUSE %s failed", func.__name__)
            raise fuse.FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def parse_hint(data: bytes) -> tuple[int, bool]:
    """`PID frozen` / `PID thawed` (one optional trailing newline) -> (pid, frozen)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "hint: not ASCII") from None
    if text.endswith("\n"):
        text = text[:-1]
    parts = text.split(" ")
    if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
        raise OSError(errno.EINVAL, "hint: expected 'PID frozen' or 'PID thawed'")
    pid = int(parts[0])
    if pid <= 0 or pid > 2**22:
        raise OSError(errno.EINVAL, "hint: pid out of range")
    if parts[1] == "frozen":
        return pid, True
    if parts[1] == "thawed":
        return pid, False
    raise OSError(errno.EINVAL, "hint: state must be 'frozen' or 'thawed'")


def proc_task_id(pid: int, proc_root: str = PROC_ROOT) -> TaskId:
    """TaskId of a live pid (a hinted one); ESRCH if gone, as the kernel's find_get_pid."""
    try:
        return task_id(pid, proc_root)
    except ProcessGone:
        raise OSError(errno.ESRCH, "No such process") from None
    except AccessDenied:
        raise OSError(errno.EACCES, "Permission denied") from None


def ksm_stat_text(row: Mapping[str, Any]) -> str:
    """A process's ksm_stat: proc_pid_ksm_stat()'s lines in its order, then what only
    lksmfs knows.  Under the `ksm` policy (the row has merge_any) exactly the kernel's
    six lines; under LKSM's the scanner's comm and slot state follow."""
    text = (f"ksm_rmap_items {row['rmap_items']}\nksm_zero_pages {row.get('zero_pages', 0)}\n"
            f"ksm_merging_pages {row['merging_pages']}\nksm_process_profit {row['profit']}\n")
    if "merge_any" in row:
        yes = ("no", "yes")
        return text + f"ksm_merge_any: {yes[bool(row['merge_any'])]}\nksm_mergeable: {yes[bool(row['mergeable'])]}\n"
    return text + f"comm {row.get('comm', '')}\nstate {row.get('state', '')}\n"


class FuseEngine(AttributeEngine, Protocol):
    """The engine surface of the lksmfs extensions: the hint file and proc/PID/."""

    def hint(self, task: TaskId, frozen: bool) -> None: ...

    def per_process(self) -> Sequence[Mapping[str, Any]]: ...


class _OpenFile:
    __slots__ = ("path", "text")

    def __init__(self, path: str) -> None:
        self.path = path
        self.text: bytes | None = None


class LksmOperations(fuse.Operations):  # type: ignore[misc]
    """FUSE callbacks over an AttributeTable.

    `engine_lock` serialises the calls that touch engine state which is not published
    lock-free (hint, per_process); attribute shows never take it.
    `resolve_task(pid)` turns a hinted pid into a TaskId; `on_hint()` runs after an
    accepted hint (the daemon wakes the crawler there).
    """

    use_ns = True

    def __init__(
        self,
        table: AttributeTable[FuseEngine],
        *,
        engine_lock: AbstractContextManager[Any] | None = None,
        resolve_task: Callable[[int], TaskId] = proc_task_id,
        on_hint: Callable[[], None] | None = None,
        on_init: Callable[[], None] | None = None,
        owner_of: Callable[[int, int], tuple[int, int]] = process_owner,
        hints: bool = True,
    ) -> None:
        self.table = table
        self.ksm = table.ksm
        self._lock: AbstractContextManager[Any] = engine_lock or nullcontext()
        self._hints = hints  # the hint file exists (LKSM's freezer hook; not under mainline)
        self._resolve_task = resolve_task
        self._on_hint = on_hint or (lambda: None)
        self._on_init = on_init or (lambda: None)
        self._files: dict[int, _OpenFile] = {}
        self._fh = itertools.count(1)
        self._time_ns = time.time_ns()
        self.nodes = NodeAttrs(self._time_ns)  # what chmod/chown/touch changed
        self._owner_of = owner_of  # (pid, start time) -> (uid, gid) of the process
        self._pp_cache: tuple[float, dict[str, Mapping[str, Any]]] = (-1.0, {})
        self._pp_lock = threading.Lock()

    # -- namespace -----------------------------------------------------------------

    def _per_process(self) -> dict[str, Mapping[str, Any]]:
        """pid -> newest slot of that pid, from a short-lived snapshot."""
        now = time.monotonic()
        with self._pp_lock:
            stamp, cached = self._pp_cache
            if 0 <= now - stamp < PER_PROCESS_TTL_S:
                return cached
            with self._lock:
                rows = self.ksm.per_process()
            by_pid: dict[str, Mapping[str, Any]] = {}
            for row in rows:
                key = str(row["pid"])
                old = by_pid.get(key)
                if old is None or row.get("start_time", 0) >= old.get("start_time", 0):
                    by_pid[key] = row
            self._pp_cache = (time.monotonic(), by_pid)
            return by_pid

    def _kind(self, path: str) -> tuple[str, int]:
        """('dir'|'attr'|'hint'|'procfile', mode) for an existing path, else ENOENT."""
        if path == "/":
            return "dir", 0o755
        parts = path.strip("/").split("/")
        if len(parts) == 1:
            name = parts[0]
            if name in self.table:
                return "attr", self.table.mode(name)
            if name == HINT and self._hints:
                return "hint", 0o200
            if name == PROC:
                return "dir", 0o555
        elif parts[0] == PROC and len(parts) in (2, 3):
            if parts[1] in self._per_process():
                if len(parts) == 2:
                    return "dir", 0o555
                if parts[2] in PROC_FILES:
                    return "procfile", 0o400  # as /proc/PID/ksm_stat
        raise OSError(errno.ENOENT, "No such file or directory")

    @guarded
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        kind, mode = self._kind(path)
        st: dict[str, Any] = self.nodes.stat(path, mode, self._owner(path))
        mode = st.pop("perm")
        if kind == "dir":
            st.update(st_mode=stat.S_IFDIR | mode, st_nlink=2, st_size=0)
        else:
            st.update(st_mode=stat.S_IFREG | mode, st_nlink=1, st_size=SYSFS_SIZE)
        return st

    @guarded
    def readdir(self, path: str, fh: Any) -> list[str]:
        kind, _ = self._kind(path)
        if kind != "dir":
            raise OSError(errno.ENOTDIR, "Not a directory")
        parts = path.strip("/").split("/") if path != "/" else []
        if not parts:
            return [".", "..", *self.table.names(), *([HINT] if self._hints else []), PROC]
        if len(parts) == 1:
            return [".", "..", *sorted(self._per_process(), key=int)]
        return [".", "..", *PROC_FILES]

    # -- files ----------------------------------------------------------------------

    @guarded
    def open(self, path: str, fi: Any) -> int:
        kind, mode = self._kind(path)
        if kind == "dir":
            raise OSError(errno.EISDIR, "Is a directory")
        accmode = fi.flags & os.O_ACCMODE
        if kind == "procfile" and accmode != os.O_RDONLY:
            raise OSError(errno.EACCES, "Permission denied")
        if kind in ("attr", "hint"):  # hint has no show: never readable
            writable = kind == "hint" or self.table.writable(path.strip("/"))
            check_open(self.nodes.mode(path, mode), accmode, can_read=kind == "attr", can_write=writable)
        fh = next(self._fh)
        self._files[fh] = _OpenFile(path)
        fi.fh = fh
        fi.direct_io = 1  # never the page cache: every read reaches show()
        return 0

    @guarded
    def release(self, path: str, fi: Any) -> int:
        self._files.pop(fi.fh, None)
        return 0

    def _render(self, path: str) -> bytes:
        parts = path.strip("/").split("/")
        if len(parts) == 1:
            return self.table.show(parts[0])
        row = self._per_process().get(parts[1])
        if row is None:
            raise OSError(errno.ENOENT, "process gone")
        rmap, merging, profit = row["rmap_items"], row["merging_pages"], row["profit"]
        if parts[2] == "rmap_items":
            return f"{rmap}\n".encode()
        if parts[2] == "merging_pages":
            return f"{merging}\n".encode()
        if parts[2] == "ksm_process_profit":
            return f"{profit}\n".encode()
        return ksm_stat_text(row).encode("utf-8", "surrogateescape")  # comm is raw bytes, fsdecoded

    @guarded
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        of = self._files.get(fi.fh)
        if of is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if offset == 0 or of.text is None:
            of.text = self._render(of.path)
        return of.text[offset : offset + size]

    @guarded
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        of = self._files.get(fi.fh)
        if of is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        name = of.path.strip("/")
        if name == HINT:
            return self._store_hint(data)
        return self.table.store(name, data)

    def _store_hint(self, data: bytes) -> int:
        data = data[:MAX_WRITE]  # kernfs_fop_write_iter: one page of a longer write
        pid, frozen = parse_hint(data.partition(b"\0")[0])  # a C string, as a store sees it
        task = self._resolve_task(pid)
        with self._lock:
            self.ksm.hint(task, frozen)
        log.info("hint: %s %s", task, "frozen" if frozen else "thawed")
        self._on_hint()
        return len(data)

    @guarded
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        kind, _ = self._kind(path)
        if kind in ("dir", "procfile"):
            raise OSError(errno.EACCES, "Permission denied")
        return 0  # `echo x > file` truncates first; sysfs ignores it too

    @guarded
    def init(self, path: str) -> None:
        self._on_init()

    # -- metadata and namespace: what sysfs answers (lksmfs.sysfs.nodes) -----------

    @staticmethod
    def _process_pid(path: str) -> str | None:
        """The PID of proc/PID and of the files below it, else None."""
        parts = path.strip("/").split("/")
        return parts[1] if parts[0] == PROC and len(parts) >= 2 else None

    def _owner(self, path: str) -> tuple[int, int]:
        """proc/PID and below belong to the process's owner, everything else to root."""
        pid = self._process_pid(path)
        row = None if pid is None else self._per_process().get(pid)
        if row is None:
            return ROOT_OWNER
        return self._owner_of(int(row["pid"]), int(row.get("start_time", 0)))

    def _setattr_path(self, path: str) -> str:
        """`path` if chmod/chown may change it; EPERM under proc/PID (proc_setattr)."""
        self._kind(path)
        if self._process_pid(path) is not None:
            raise OSError(errno.EPERM, "Operation not permitted")
        return path

    @guarded
    def chmod(self, path: str, mode: int) -> int:
        self.nodes.chmod(self._setattr_path(path), mode)
        return 0

    @guarded
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.nodes.chown(self._setattr_path(path), uid, gid)
        return 0

    @guarded
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._kind(path)
        if self._process_pid(path) is None:
            self.nodes.utimens(path, times)
        return 0  # proc/PID: accepted and forgotten, as /proc does

    @guarded
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise no_create()

    @guarded
    def _no_namespace_change(self, *args: Any) -> int:
        raise no_namespace_change()

    rename = unlink = mkdir = rmdir = symlink = link = mknod = _no_namespace_change


def mount(
    ops: LksmOperations,
    mountpoint: str,
    *,
    allow_other: bool = True,
    debug: bool = False,
) -> None:
    """Serve `ops` at `mountpoint` in the foreground until unmounted or signalled.

    libfuse installs its own SIGTERM/SIGINT/SIGHUP handlers for the duration: they end
    the loop, and libfuse unmounts before this returns.
    """
    logging.getLogger("mfusepy").setLevel(logging.DEBUG if debug else logging.WARNING)
    fuse.FUSE(
        ops,
        mountpoint,
        raw_fi=True,
        foreground=True,
        debug=debug,
        allow_other=allow_other,
        default_permissions=True,
        direct_io=True,
        fsname="lksmfs",
        subtype="lksmfs",
    )
