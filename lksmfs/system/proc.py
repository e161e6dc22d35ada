"""/proc task facts: one parser per file, one errno mapping (psutil's _pslinux.py).

- identity:  (pid, start time) - /proc/PID/stat field 22 - because pids are reused -
             and the image: an exec gives the task a new mm (see `TaskId.image`)
- stat:      comm, state, PF_KTHREAD, fault counts, utime/stime (one parser: comm may
             hold spaces and ')', so fields resume after the LAST ')')
- schedstat: se.sum_exec_runtime, the CPU time LKSM's short-task rule looks at
- status:    RssAnon (get_mm_counter(mm, MM_ANONPAGES)), VmRSS, VmHWM
- comm:      the task's name, at most 15 characters

Errors: every failure to read a task's file is mapped in one place, `as_task_error` (the
context manager `wrap_exceptions`), as psutil's `wrap_exceptions` does.  Read through a
pinned `TaskDir`, whatever went wrong (ESRCH, ENOENT, EIO, an empty or truncated file, a
0-byte read) is ProcessGone once the task is gone or a zombie - a task that is going fails
every file it has in its own way - and AccessDenied for EACCES/EPERM; while it is alive
and well the error is the caller's (an optional file missing, an unmapped page).  By pid,
without a pinned directory, ENOENT/ESRCH mean gone.

The root is a parameter everywhere (`proc_root`, psutil's PROCFS_PATH), so unit tests run
on a fake tree.  `TaskDir` pins /proc/PID with a directory fd: once open it keeps naming
the same process, so a pid reused later reads as ESRCH/ENOENT instead of silently
switching to another process.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PROC_ROOT = "/proc"
# The page size every /proc interface counts in (pagemap entries, mem offsets, *_pages).
PAGE_SIZE = 4096
PAGE_SHIFT = 12
PF_KTHREAD = 0x00200000  # include/linux/sched.h
CLK_TCK = os.sysconf("SC_CLK_TCK")

GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


class ProcessGone(Exception):
    """The task exited (ENOENT/ESRCH/EIO while reading): the engine takes ksm_exit's path."""


class TaskFailed(ProcessGone):
    """Reading the task failed in a way no rule explains (an errno /proc should not give,
    a file that does not parse while the task lives): the engine drops the task as if
    it had exited, and counts it apart (tasks_failed) - one task never stops a thread."""


class AccessDenied(Exception):
    """The task exists but may not be read (EACCES/EPERM): the engine skips and counts it."""


@dataclass(frozen=True, order=True)
class TaskId:
    """Task identity: pid *and* start time (/proc/PID/stat field 22), since pids are
    reused.  `image` tells the task's mms apart: execve() gives the task a new mm (the
    old one takes ksm_exit's path, the new one is a newcomer), which no /proc file
    numbers; it is a digest of the layout the exec chose (stat's start_code, end_code,
    start_stack: set by execve and by nothing else but a checkpoint/restore prctl), 0
    when unknown (a short stat, a hand-made id).  It is not part of equality - a task
    is found by pid and start time, whatever mm it has now; who needs the mm compares
    it (`same_image`, `same_mm`)."""

    pid: int
    start_time: int
    image: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"

    def same_image(self, other: TaskId) -> bool:
        """The same mm as `other` (the same task, and no exec between them), as far as
        their images tell (an unknown one, 0, says nothing)?"""
        return self == other and (not self.image or not other.image or self.image == other.image)

    def same_mm(self, st: StatFields) -> bool:
        """Does `st`, read from /proc/PID now, still describe this mm (no pid reuse, no
        exec since, not past exit_mm())?"""
        return st.starttime == self.start_time and st.has_mm and (not self.image or st.image == self.image)


# ----------------------------------------------------------------------------- errors


def as_task_error(exc: BaseException, what: str, alive: Callable[[], bool] | None = None) -> BaseException:
    """The one mapping of a failed read of a task's /proc file named by `what`.

    ESRCH is always ProcessGone: the task is gone, or the mm a mem/pagemap fd was opened
    on is (the task exec'd since).  With `alive` (the task's liveness, from a pinned
    directory): any other OSError, or a parse error of an empty or truncated file, is
    ProcessGone when the task is gone or a zombie; otherwise EACCES/EPERM are
    AccessDenied and anything else is `exc` itself.  Without it: ENOENT is ProcessGone,
    EACCES/EPERM AccessDenied, the rest `exc`."""
    if isinstance(exc, (ProcessGone, AccessDenied)):
        return exc
    if not isinstance(exc, (OSError, ValueError, IndexError)):
        return exc
    why = describe_error(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.ESRCH:  # never a missing file: the task, or the mm that was opened (exec), is gone
        return ProcessGone(f"{what}: {why}")
    if alive is not None and not alive():
        return ProcessGone(f"{what}: {why} (the task is gone or exiting)")
    if code in DENIED_ERRNOS:
        return AccessDenied(f"{what}: {why}")
    if alive is None and code in GONE_ERRNOS:
        return ProcessGone(f"{what}: {why}")
    return exc


def describe_error(exc: BaseException) -> str:
    """`[Errno 3] ESRCH No such process`: the errno's number and name where there is one."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return f"[Errno {code}] {errno.errorcode.get(code, '?')} {os.strerror(code)}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def wrap_exceptions(what: str, alive: Callable[[], bool] | None = None) -> Iterator[None]:
    """Run a block that reads a task's /proc files; failures leave as `as_task_error`'s."""
    try:
        yield
    except (OSError, ValueError, IndexError) as e:
        err = as_task_error(e, what, alive)
        if err is e:
            raise
        raise err from e


def read_all(path: str, dir_fd: int | None = None) -> bytes:
    """Read a whole (/proc) file; /proc files must be read to EOF, their size says nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- parsers


@dataclass(frozen=True)
class StatFields:
    """The /proc/PID/stat fields lksmfs uses (1-based field numbers, proc(5))."""

    pid: int  # 1
    comm: str  # 2, without the parentheses
    state: str  # 3
    flags: int  # 9
    minflt: int  # 10
    majflt: int  # 12
    utime: int  # 14, clock ticks
    stime: int  # 15, clock ticks
    starttime: int  # 22, clock ticks since boot
    image: int = 0  # TaskId.image: from fields 26 (start_code), 27 (end_code), 28 (start_stack)
    has_mm: bool = True  # False when those fields read 0 0 0: no mm (exiting, a zombie, a kthread)

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def task_id(self) -> TaskId:
        return TaskId(self.pid, self.starttime, self.image)

    @property
    def cpu_ns(self) -> int:
        """utime + stime in ns (clock-tick resolution: schedstat is the precise one)."""
        return (self.utime + self.stime) * 1_000_000_000 // CLK_TCK

    @property
    def alive(self) -> bool:
        """Not a zombie or dead task, nor one past exit_mm(): it still has an mm to read."""
        return self.has_mm and self.state not in ("Z", "X", "x")


def parse_stat(data: bytes) -> StatFields:
    """Parse /proc/PID/stat.  comm may hold spaces and ')' so split at the LAST ')'."""
    lp = data.find(b"(")
    rp = data.rfind(b")")
    if lp < 0 or rp < lp:
        raise ValueError(f"malformed stat: {data[:80]!r}")
    rest = data[rp + 1 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3]
    if len(rest) < 20:
        raise ValueError(f"short stat: {data[:80]!r}")
    return StatFields(
        pid=int(data[:lp]),
        comm=os.fsdecode(data[lp + 1 : rp]),
        state=rest[0].decode("ascii", "replace"),
        flags=int(rest[6]),
        minflt=int(rest[7]),
        majflt=int(rest[9]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        starttime=int(rest[19]),
        image=_image(rest),
        has_mm=len(rest) < 26 or any(f != b"0" for f in rest[23:26]),
    )


_IMAGE_MASK = (1 << 62) - 1


def _image(rest: list[bytes]) -> int:
    """TaskId.image from stat fields 26-28 (rest[23:26]): 0 when the line is too short,
    or the fields are all zero (no mm: a zombie, a kernel thread).  Without ptrace access
    the kernel prints 1 1 0 for every task (exec is then not told)."""
    if len(rest) < 26:
        return 0
    start_code, end_code, start_stack = int(rest[23]), int(rest[24]), int(rest[25])
    if not (start_code or end_code or start_stack):
        return 0
    # the same on every run and in every process (no hash() seed)
    mixed = (start_code * 0x9E3779B97F4A7C15) ^ (end_code * 0xC2B2AE3D27D4EB4F) ^ start_stack
    return mixed & _IMAGE_MASK or 1


def parse_schedstat(data: bytes) -> int:
    """se.sum_exec_runtime in ns: the first field of /proc/PID/schedstat."""
    return int(data.split()[0])


def parse_status_kib(data: bytes, field: str) -> int | None:
    """A `Field:   N kB` line of /proc/PID/status (VmRSS, VmHWM, RssAnon...) in KiB;
    None when the task has no such line (a kernel thread has no mm)."""
    key = field.encode() + b":"
    for line in data.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return None


def parse_rss_anon(data: bytes) -> int:
    """RssAnon of /proc/PID/status in pages (0 for a task without an mm: no such line)."""
    return (parse_status_kib(data, "RssAnon") or 0) * 1024 // PAGE_SIZE


# ----------------------------------------------------------------- by pid, not pinned


def read_stat(pid: int | str, proc_root: str = PROC_ROOT) -> StatFields:
    """/proc/PID/stat now; ProcessGone/AccessDenied (a malformed or empty one: gone)."""
    what = f"{pid} stat"
    with wrap_exceptions(what):
        data = read_all(f"{proc_root}/{pid}/stat")
    return _parse_or_gone(data, what)


def _parse_or_gone(data: bytes, what: str) -> StatFields:
    if not data:
        raise ProcessGone(f"{what}: empty")
    try:
        return parse_stat(data)
    except ValueError as e:
        raise ProcessGone(f"{what}: {e}") from e


def try_stat(pid: int, proc_root: str = PROC_ROOT) -> StatFields | None:
    """/proc/PID/stat, or None when the task is gone or unreadable (scans of /proc)."""
    try:
        return read_stat(pid, proc_root)
    except (ProcessGone, AccessDenied, OSError):
        return None


def _alive(task: TaskId, proc_root: str) -> bool:
    """Is `task` there, not a zombie, by its pid (before a directory is pinned)?"""
    st = try_stat(task.pid, proc_root)
    return st is not None and st.alive and st.starttime == task.start_time


def task_id(pid: int, proc_root: str = PROC_ROOT) -> TaskId:
    """TaskId of a live pid; ProcessGone if there is none."""
    return read_stat(pid, proc_root).task_id


def state(pid: int, proc_root: str = PROC_ROOT) -> str:
    """The one-letter state (R, S, T, Z...), '' once the process is gone."""
    st = try_stat(pid, proc_root)
    return st.state if st is not None else ""


def runtime_ns(pid: int | str = "self", proc_root: str = PROC_ROOT) -> int:
    """se.sum_exec_runtime of a task (schedstat), in ns."""
    with wrap_exceptions(f"{pid} schedstat"):
        return parse_schedstat(read_all(f"{proc_root}/{pid}/schedstat"))


def status_kib(field: str, pid: int | str = "self", proc_root: str = PROC_ROOT) -> int:
    """A /proc/PID/status figure in KiB (VmRSS, VmHWM, RssAnon...); KeyError if absent."""
    with wrap_exceptions(f"{pid} status"):
        got = parse_status_kib(read_all(f"{proc_root}/{pid}/status"), field)
    if got is None:
        raise KeyError(field)
    return got


def rss_anon_pages(pid: int | str, proc_root: str = PROC_ROOT) -> int:
    """RssAnon of a task in pages."""
    with wrap_exceptions(f"{pid} status"):
        return parse_rss_anon(read_all(f"{proc_root}/{pid}/status"))


def read_comm(pid: int, proc_root: str = PROC_ROOT) -> str | None:
    """The task's comm (no trailing newline), or None if it is gone."""
    try:
        return os.fsdecode(read_all(f"{proc_root}/{pid}/comm").rstrip(b"\n"))
    except OSError:
        return None


def owner(task: TaskId, proc_root: str = PROC_ROOT) -> tuple[int, int] | None:
    """(uid, gid) of /proc/PID (task_dump_owner) while it is still `task`; None when it is
    gone or the pid was reused."""
    try:
        st = os.stat(f"{proc_root}/{task.pid}")
    except OSError:
        return None
    now = try_stat(task.pid, proc_root)  # after the stat: the same process if it matches
    if now is None or not task.same_mm(now):
        return None
    return st.st_uid, st.st_gid


def parse_ksm_stat(data: bytes) -> dict[str, str]:
    """/proc/PID/ksm_stat: `name value` lines (`ksm_rmap_items 12`) and, since 6.x,
    `name: yes|no` ones (`ksm_merge_any: yes`, `ksm_mergeable: yes`)."""
    out: dict[str, str] = {}
    for line in data.decode("ascii", "replace").splitlines():
        name, _, value = line.partition(" ")
        if name:
            out[name.rstrip(":")] = value.strip()
    return out


def ksm_stat_fields(pid: int, proc_root: str = PROC_ROOT) -> dict[str, str]:
    """/proc/PID/ksm_stat parsed; {} when it cannot be read (gone, denied, no KSM)."""
    try:
        return parse_ksm_stat(read_all(f"{proc_root}/{pid}/ksm_stat"))
    except OSError:
        return {}


def ksm_stat_registered(fields: dict[str, str]) -> bool | None:
    """`ksm_mergeable: yes` (a VM_MERGEABLE mapping) or `ksm_merge_any: yes`
    (prctl(PR_SET_MEMORY_MERGE)); None when ksm_stat has neither line (before 6.x)."""
    if "ksm_mergeable" not in fields and "ksm_merge_any" not in fields:
        return None
    return "yes" in (fields.get("ksm_mergeable"), fields.get("ksm_merge_any"))


def ksm_registered(pid: int, proc_root: str = PROC_ROOT) -> bool | None:
    """Is `pid`'s mm registered with the kernel's KSM, by an unpinned look (the
    lifecycle watcher's sweep of every pid)?  False when it is gone or a zombie (its
    ksm_stat is empty), None when ksm_stat cannot tell (ask its smaps)."""
    try:
        data = read_all(f"{proc_root}/{pid}/ksm_stat")
    except OSError as e:
        return False if e.errno in GONE_ERRNOS else None
    return ksm_stat_registered(parse_ksm_stat(data)) if data else False


def pids(proc_root: str = PROC_ROOT) -> list[int]:
    """Every pid in /proc, in order (for_each_process, kernel threads included)."""
    with os.scandir(proc_root) as it:
        return sorted(int(d.name) for d in it if d.name.isdigit())


# ------------------------------------------------------------------------ pinned task


class TaskDir:
    """/proc/PID of one task, pinned by a directory fd; files are read relative to it."""

    __slots__ = ("task", "fd")

    def __init__(self, task: TaskId, fd: int) -> None:
        self.task = task
        self.fd = fd

    @classmethod
    def open(cls, task: TaskId, proc_root: str = PROC_ROOT) -> tuple[TaskDir, StatFields]:
        """Open /proc/PID and check that it is still the same process (start time)."""
        with wrap_exceptions(str(task), lambda: _alive(task, proc_root)):
            fd = os.open(f"{proc_root}/{task.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        d = cls(task, fd)
        try:
            st = d.stat()
            if not task.same_mm(st):
                raise ProcessGone(f"{task}: pid reused or exec'd (start time now {st.starttime})")
        except BaseException:
            d.close()
            raise
        return d, st

    def errors(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The block reads the task's file `name`: its failures leave as `as_task_error`'s,
        ProcessGone whenever the task is gone or a zombie by then."""
        return wrap_exceptions(f"{self.task} {name}", self.alive)

    def read(self, name: str) -> bytes:
        """A whole file of the task's directory.  Empty only for a task that is alive (a
        kernel thread's smaps): a zombie's files are empty too, and it is gone."""
        with self.errors(name):
            data = read_all(name, dir_fd=self.fd)
        if not data:
            self.ensure_alive(name, "empty")
        return data

    def ensure_alive(self, name: str, what: str) -> None:
        """ProcessGone unless the task is alive: `what` (an empty file, a 0-byte read of
        `name`) is how a task that is going answers."""
        if not self.alive():
            raise ProcessGone(f"{self.task} {name}: {what} (the task is gone or exiting)")

    def open_file(self, name: str) -> int:
        """An O_RDONLY fd on a file of the task's directory (mem, pagemap)."""
        with self.errors(name):
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)

    def stat(self) -> StatFields:
        return _parse_or_gone(self.read("stat"), f"{self.task} stat")

    def alive(self) -> bool:
        """Is the task still there with an mm (not gone, not a zombie)?  Reads stat
        directly: every error mapping asks this, so it must not map errors itself."""
        try:
            st = parse_stat(read_all("stat", dir_fd=self.fd))
        except (OSError, ValueError):
            return False
        return st.alive and self.task.same_mm(st)

    def rss_anon_pages(self) -> int:
        data = self.read("status")
        with self.errors("status"):
            return parse_rss_anon(data)

    def threads_cpu(self) -> tuple[tuple[int, int], ...] | None:
        """(tid, se.sum_exec_runtime) of every thread of the task, sorted: equal at two
        moments only if no thread of it ran in between (threads that come or go change
        it too).  None when there is no answer while the task lives: no task/ directory
        (a minimal /proc tree), no schedstat (CONFIG_SCHED_INFO=n), a thread that ended
        between the listing and its read.  ProcessGone once the task itself is gone."""
        with self.errors("task"):
            try:
                tfd = os.open("task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
            except FileNotFoundError:
                if self.alive():
                    return None
                raise
        try:
            with self.errors("task"):
                tids = sorted(int(n) for n in os.listdir(tfd) if n.isdigit())
            if not tids and not self.alive():  # a reaped task's task/ lists nothing
                raise ProcessGone(f"{self.task} task: no threads")
            out = []
            for tid in tids:
                with self.errors(f"task/{tid}/schedstat"):
                    try:
                        out.append((tid, parse_schedstat(read_all(f"{tid}/schedstat", dir_fd=tfd))))
                    except (OSError, IndexError, ValueError):
                        if self.alive():
                            return None  # a thread that just ended, or no schedstat: no answer
                        raise
            return tuple(out)
        finally:
            os.close(tfd)

    def runtime_ns(self, st: StatFields) -> int:
        """sum_exec_runtime from schedstat; utime+stime ticks (`st`) without schedstat
        (CONFIG_SCHED_INFO=n).  ProcessGone when it is gone meanwhile."""
        with self.errors("schedstat"):
            try:
                return parse_schedstat(read_all("schedstat", dir_fd=self.fd))
            except (OSError, IndexError, ValueError):
                if self.alive():
                    return st.cpu_ns
                raise

    def ksm_registered(self) -> bool | None:
        """Is the task's mm registered with the kernel's KSM: a VM_MERGEABLE mapping
        (madvise(MADV_MERGEABLE), `ksm_mergeable: yes`) or prctl(PR_SET_MEMORY_MERGE)
        (`ksm_merge_any: yes`)?  None when ksm_stat has no such lines (a kernel before
        6.x: ask its smaps); ProcessGone when it is gone (a zombie's ksm_stat is empty)."""
        try:
            return ksm_stat_registered(parse_ksm_stat(self.read("ksm_stat")))
        except FileNotFoundError:  # alive, but no ksm_stat in this kernel
            return None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
