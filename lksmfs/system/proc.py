"""/proc task facts: one parser per file, one errno mapping (psutil's _pslinux.py).

- identity:  (pid, start time) - /proc/PID/stat field 22 - because pids are reused
- stat:      comm, state, PF_KTHREAD, fault counts, utime/stime (one parser: comm may
             hold spaces and ')', so fields resume after the LAST ')')
- schedstat: se.sum_exec_runtime, the CPU time LKSM's short-task rule looks at
- status:    RssAnon (get_mm_counter(mm, MM_ANONPAGES)), VmRSS, VmHWM
- comm:      the task's name, at most 15 characters

Errors: an OSError on a task's file becomes ProcessGone (ENOENT, ESRCH) or AccessDenied
(EACCES, EPERM) in one place, `as_task_error` / `wrap_exceptions`, as psutil's
`wrap_exceptions` does.  EIO from /proc/PID/mem or pagemap means "gone" only when the
task is gone: an unmapped page answers the same, so the procfs source asks
`TaskDir.alive()` before it says ProcessGone.

The root is a parameter everywhere (`proc_root`, psutil's PROCFS_PATH), so unit tests run
on a fake tree.  `TaskDir` pins /proc/PID with a directory fd: once open it keeps naming
the same process, so a pid reused later reads as ESRCH/ENOENT instead of silently
switching to another process.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

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


class AccessDenied(Exception):
    """The task exists but may not be read (EACCES/EPERM): the engine skips and counts it."""


@dataclass(frozen=True, order=True)
class TaskId:
    """Task identity: pid *and* start time (/proc/PID/stat field 22), since pids are reused."""

    pid: int
    start_time: int

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"


# ----------------------------------------------------------------------------- errors


def as_task_error(exc: OSError, what: str) -> Exception:
    """The project's exception for `exc`, met on a task's /proc file named by `what`:
    ProcessGone, AccessDenied, or `exc` itself for anything else."""
    if exc.errno in GONE_ERRNOS:
        return ProcessGone(f"{what}: {exc.strerror}")
    if exc.errno in DENIED_ERRNOS:
        return AccessDenied(f"{what}: {exc.strerror}")
    return exc


@contextlib.contextmanager
def wrap_exceptions(what: str) -> Iterator[None]:
    """Run a block that reads a task's /proc files; OSErrors leave as `as_task_error`'s."""
    try:
        yield
    except OSError as e:
        err = as_task_error(e, what)
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

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def task_id(self) -> TaskId:
        return TaskId(self.pid, self.starttime)

    @property
    def cpu_ns(self) -> int:
        """utime + stime in ns (clock-tick resolution: schedstat is the precise one)."""
        return (self.utime + self.stime) * 1_000_000_000 // CLK_TCK

    @property
    def alive(self) -> bool:
        """Not a zombie or dead task: it still has an mm to read."""
        return self.state not in ("Z", "X", "x")


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
    )


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
    if now is None or now.starttime != task.start_time:
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


def ksm_registered(pid: int, proc_root: str = PROC_ROOT) -> bool | None:
    """Is the task's mm registered with the kernel's KSM: a VM_MERGEABLE mapping
    (madvise(MADV_MERGEABLE), `ksm_mergeable: yes`) or prctl(PR_SET_MEMORY_MERGE)
    (`ksm_merge_any: yes`)?  False when it is gone; None when ksm_stat has no such
    lines (a kernel before 6.x: ask its smaps)."""
    try:
        fields = parse_ksm_stat(read_all(f"{proc_root}/{pid}/ksm_stat"))
    except OSError as e:
        return False if e.errno in GONE_ERRNOS else None
    if "ksm_mergeable" not in fields and "ksm_merge_any" not in fields:
        return None
    return "yes" in (fields.get("ksm_mergeable"), fields.get("ksm_merge_any"))


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
        with wrap_exceptions(str(task)):
            fd = os.open(f"{proc_root}/{task.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        d = cls(task, fd)
        try:
            st = d.stat()
            if st.starttime != task.start_time:
                raise ProcessGone(f"{task}: pid reused (start time now {st.starttime})")
        except BaseException:
            d.close()
            raise
        return d, st

    def read(self, name: str) -> bytes:
        """A whole file of the task's directory."""
        with wrap_exceptions(f"{self.task} {name}"):
            return read_all(name, dir_fd=self.fd)

    def open_file(self, name: str) -> int:
        """An O_RDONLY fd on a file of the task's directory (mem, pagemap)."""
        with wrap_exceptions(f"{self.task} {name}"):
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)

    def stat(self) -> StatFields:
        return _parse_or_gone(self.read("stat"), f"{self.task} stat")

    def alive(self) -> bool:
        """Is the task still there with an mm (not gone, not a zombie)?"""
        try:
            st = self.stat()
        except (ProcessGone, AccessDenied):
            return False
        return st.alive and st.starttime == self.task.start_time

    def rss_anon_pages(self) -> int:
        return parse_rss_anon(self.read("status"))

    def threads_cpu(self) -> tuple[tuple[int, int], ...] | None:
        """(tid, se.sum_exec_runtime) of every thread of the task, sorted: equal at two
        moments only if no thread of it ran in between (threads that come or go change
        it too).  None without per-thread schedstat (CONFIG_SCHED_INFO=n)."""
        try:
            tfd = os.open("task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            if not self.alive():
                raise ProcessGone(f"{self.task}: gone") from None
            return None  # no task/ directory (a minimal /proc tree): no answer
        except OSError as e:
            err = as_task_error(e, f"{self.task} task")
            if err is e:
                raise
            raise err from e
        try:
            out = []
            with wrap_exceptions(f"{self.task} task"):
                tids = sorted(int(n) for n in os.listdir(tfd) if n.isdigit())
            for tid in tids:
                try:
                    out.append((tid, parse_schedstat(read_all(f"{tid}/schedstat", dir_fd=tfd))))
                except FileNotFoundError:
                    if not self.alive():
                        raise ProcessGone(f"{self.task}: gone") from None
                    return None  # a thread that just ended, or no schedstat: no answer
                except (IndexError, ValueError):
                    return None
            return tuple(out)
        finally:
            os.close(tfd)

    def runtime_ns(self, st: StatFields) -> int:
        """sum_exec_runtime from schedstat; utime+stime ticks (`st`) without schedstat
        (CONFIG_SCHED_INFO=n).  ProcessGone when it is gone meanwhile."""
        try:
            return parse_schedstat(read_all("schedstat", dir_fd=self.fd))
        except OSError as e:
            if e.errno in GONE_ERRNOS and not self.alive():
                raise ProcessGone(f"{self.task} schedstat") from e
        except (IndexError, ValueError):
            pass
        return st.cpu_ns

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
