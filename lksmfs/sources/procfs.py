"""The procfs memory source: real processes, read-only, through /proc (SPEC section 4).

Every kernel concept the engine asks about is answered from a /proc file:

- tasks:      /proc/[0-9]*, minus kernel threads (PF_KTHREAD in stat) and the daemon itself
- identity:   (pid, starttime) - stat field 22 - because pids are reused, and the
              image an exec chose (TaskId.image): an exec'd task is a new mm
- VMAs:       /proc/PID/smaps (the maps lines plus `Anonymous:` and `VmFlags:`)
- anon pages: /proc/PID/pagemap (present, PFN) + /proc/kpageflags (ANON, ZERO_PAGE)
- contents:   process_vm_readv(2), or pread on /proc/PID/mem where it is not allowed,
              coalescing runs of pages into one big read

Per-task files are opened relative to a directory fd on /proc/PID: once that directory
is open it keeps naming the same process, so a pid that is reused later reads as
ESRCH/ENOENT (ProcessGone) instead of silently switching to another process.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from lksmfs.sources.base import PAGE_SHIFT, PAGE_SIZE, AccessDenied, Mapping, ProcessGone, TaskId, TaskStat
from lksmfs.sources.scope import Scope
from lksmfs.system import numa
from lksmfs.system.proc import (
    GONE_ERRNOS,
    PROC_ROOT,
    StatFields,
    TaskDir,
    TaskFailed,
    describe_error,
    ksm_stat_fields,
    try_stat,
)

__all__ = ["ProcfsSource", "parse_maps", "parse_smaps"]

# /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
PM_MMAP_EXCLUSIVE_BIT = 56  # mapped by this process only: never the (huge) zero page
PM_FILE_OR_SHARED_ANON_BIT = 61
PM_PRESENT_BIT = 63
# /proc/kpageflags bits
KPF_ANON_BIT = 12
KPF_COMPOUND_HEAD_BIT = 15
KPF_THP_BIT = 22
KPF_ZERO_PAGE_BIT = 24
HPAGE_PMD_NR = 512  # pages of a PMD-mapped transparent huge page (4 KiB pages)


def _kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a uname release such as '6.18.44-fc-v1045'; (0, 0) if unknown."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


# From Linux 6.12 the split of an anonymous THP gives its zero-filled pages the shared zero
# page (lksmfs.engine.thp); before, a split changes nothing KSM counts once converged, and
# huge pages are told as none (scanned as small pages).
THP_SPLIT_REMAPS_ZERO = _kernel_version(os.uname().release) >= (6, 12)

# VmFlags mnemonics of what ksm_join refuses: VM_SHARED, VM_PFNMAP, VM_IO,
# VM_DONTEXPAND, VM_HUGETLB, VM_MIXEDMAP.
UNMERGEABLE_VMFLAGS = frozenset({"sh", "pf", "io", "de", "ht", "mm"})
VM_MERGEABLE_FLAG = "mg"  # VM_MERGEABLE: madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE)
# Kernel-provided special mappings: never anonymous user memory.
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vdso]", "[vvar_vclock]", "[uprobes]", "[sigpage]"})
# Not a VMA at all (the gate area is printed by maps but lives above TASK_SIZE).
NOT_A_VMA = frozenset({"[vsyscall]"})

# pagemap is read in chunks so a huge reserved range (e.g. 64 GiB PROT_NONE) costs
# bounded memory; 16 Ki entries = 128 KiB per read (the arrays derived from one read are
# a scan's largest temporaries: a few MiB at 64 Ki entries).
_PAGEMAP_CHUNK = 1 << 14
# present_anon reserves room for this many pages at most before it knows how many there
# are: 64 MiB of virtual memory (32 GiB of address space), touched only where filled
_ROOM_AT_ONCE = 1 << 23
# Two PFN runs closer than this are fetched from kpageflags with one pread: reading a
# few unneeded flags words is much cheaper than another syscall.
_KPF_GAP = 64
_DEFAULT_MAX_OPEN_TASKS = 16
_AUTO_SELF = -1
_NO_VPNS = np.zeros(0, dtype=np.uint64)
# process_vm_readv(2) errors that mean "not here": the reads go to /proc/PID/mem instead
# (a seccomp filter or an LSM may forbid the call where the file is allowed)
_VM_READ_REFUSED = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})


# ------------------------------------------------------------------- process_vm_readv


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load_process_vm_readv() -> Any:
    """libc's process_vm_readv, typed; None where libc has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    iov = ctypes.POINTER(_IoVec)
    fn.argtypes = [ctypes.c_int, iov, ctypes.c_ulong, iov, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


_PROCESS_VM_READV = _load_process_vm_readv()


def process_vm_read(pid: int, buf: memoryview, addr: int) -> int:
    """Read len(buf) bytes of `pid`'s memory at `addr` into `buf` with one
    process_vm_readv(2) - the bytes a pread of /proc/PID/mem gives, without the /proc file
    (about 20% faster here).  Returns the count read: a short one stops before the first
    page that cannot be read.  OSError carries the call's errno: EFAULT (nothing readable
    at `addr`), ESRCH (no such process), EPERM, ENOSYS."""
    if _PROCESS_VM_READV is None:
        raise OSError(errno.ENOSYS, "process_vm_readv: not in libc")
    n = len(buf)
    if n == 0:
        return 0
    target = (ctypes.c_char * n).from_buffer(buf)
    try:
        local = _IoVec(ctypes.addressof(target), n)
        remote = _IoVec(addr, n)
        got = int(_PROCESS_VM_READV(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
    finally:
        del target  # release the buffer (a bytearray cannot be resized while exported)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
    return got


# ---------------------------------------------------------------------------- parsers


# Every process maps the same libraries: their path strings, the perms strings and the
# (dev, inode) pairs are shared between the parsed VMAs of all tasks (a scope of 33
# Python processes holds 13,000 VMAs; without sharing, their strings and pairs were as
# large as the rmap items of 100,000 pages).  Bounded: cleared when it fills.
_SHARED: dict[Hashable, Any] = {}
_SHARED_MAX = 1 << 16
_T = TypeVar("_T", bound=Hashable)


def _shared(value: _T) -> _T:
    got: _T | None = _SHARED.get(value)
    if got is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        _SHARED[value] = got = value
    return got


def _parse_vma_line(line: bytes) -> tuple[int, int, str, int, int, str] | None:
    """One maps line -> (start, end, perms, dev, inode, path); None if it is not one."""
    parts = line.split(None, 5)
    if len(parts) < 5 or b"-" not in parts[0]:
        return None
    s, _, e = parts[0].partition(b"-")
    try:
        start = int(s, 16)
        end = int(e, 16)
        maj, _, mnr = parts[3].partition(b":")
        dev = os.makedev(int(maj, 16), int(mnr, 16))
        inode = int(parts[4])
    except ValueError:
        return None
    path = _shared(os.fsdecode(parts[5].rstrip(b"\n"))) if len(parts) == 6 else ""
    return start, end, _shared(parts[1].decode("ascii", "replace")), dev, inode, path


def _make_mapping(
    fields: tuple[int, int, str, int, int, str], vmflags: frozenset[str] | None, anon_kb: int | None,
    huge_kb: int = 0,
) -> Mapping | None:
    """Build the Mapping ksm_join would see; None for things that are not VMAs."""
    start, end, perms, dev, inode, path = fields
    if path in NOT_A_VMA:
        return None
    mergeable = not (len(perms) > 3 and perms[3] == "s")
    if vmflags is not None and vmflags & UNMERGEABLE_VMFLAGS:
        mergeable = False
    if path in SPECIAL_MAPPINGS:
        mergeable = False
    # hook for mainline ksmd (lksmfs.engine.ksmd): VM_MERGEABLE, set by madvise/prctl
    vm_mergeable = vmflags is not None and VM_MERGEABLE_FLAG in vmflags
    return Mapping(
        start=start,
        end=end,
        perms=perms,
        file=_shared((dev, inode)) if inode != 0 else None,
        path=path,
        mergeable=mergeable,
        # without smaps we cannot know about anon_vma: assume there may be anon pages
        has_anon=True if anon_kb is None else anon_kb > 0,
        anon_pages=-1 if anon_kb is None else anon_kb * 1024 // PAGE_SIZE,
        huge_pages=huge_kb * 1024 // PAGE_SIZE,
        vm_mergeable=vm_mergeable,
    )


def parse_maps(data: bytes) -> list[Mapping]:
    """Parse /proc/PID/maps (no VmFlags: only perms decide mergeability)."""
    out: list[Mapping] = []
    for line in data.splitlines():
        f = _parse_vma_line(line)
        if f is None:
            continue
        m = _make_mapping(f, None, None)
        if m is not None:
            out.append(m)
    return out


def parse_smaps(data: bytes) -> list[Mapping]:
    """Parse /proc/PID/smaps: maps header lines, each followed by `Key: value` lines."""
    out: list[Mapping] = []
    cur: tuple[int, int, str, int, int, str] | None = None
    vmflags: frozenset[str] | None = None
    anon_kb: int | None = None
    huge_kb = 0

    def flush() -> None:
        if cur is not None:
            m = _make_mapping(cur, vmflags, anon_kb, huge_kb)
            if m is not None:
                out.append(m)

    for line in data.splitlines():
        head, _, _rest = line.partition(b" ")
        if head.endswith(b":"):
            if head == b"VmFlags:":
                vmflags = frozenset(line[8:].decode("ascii", "replace").split())
            elif head == b"Anonymous:":
                try:
                    anon_kb = int(line.split()[1])
                except (IndexError, ValueError):
                    anon_kb = None
            elif head == b"AnonHugePages:":
                try:
                    huge_kb = int(line.split()[1])
                except (IndexError, ValueError):
                    huge_kb = 0
            continue
        f = _parse_vma_line(line)
        if f is None:
            continue
        flush()
        cur, vmflags, anon_kb, huge_kb = f, None, None, 0
    flush()
    return out


# ------------------------------------------------------------------------------ source


_OPEN_LOCK = threading.Lock()
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_task(
    fn: Callable[Concatenate[ProcfsSource, TaskId, _P], _R],
) -> Callable[Concatenate[ProcfsSource, TaskId, _P], _R]:
    """A per-task call of the source: what no rule maps (proc.as_task_error) leaves as
    TaskFailed, a ProcessGone, so the engine drops that one task and goes on."""

    def call(self: ProcfsSource, task: TaskId, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, task, *args, **kwargs)
        except (ProcessGone, AccessDenied):
            raise
        except Exception as e:  # noqa: BLE001 - one task's trouble, whatever it is, is that task's
            raise self._failed(task, fn.__name__, e) from e

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return call


class _TaskHandle:
    """Open fds of one task being scanned: its /proc/PID dir, mem, pagemap (opened lazily)."""

    __slots__ = ("task", "dir", "mem_fd", "pagemap_fd", "busy", "stat0")

    def __init__(self, task_dir: TaskDir, stat0: StatFields | None = None) -> None:
        self.task = task_dir.task
        self.dir = task_dir
        self.mem_fd = -1
        self.pagemap_fd = -1
        self.busy = 0
        # the stat read when the handle was opened: valid only during that same call
        self.stat0 = stat0

    def fd(self, name: str) -> int:
        """The fd of `mem` or `pagemap`, opening it on first use (two threads reading
        one task's pages may both ask)."""
        attr = "mem_fd" if name == "mem" else "pagemap_fd"
        fd: int = getattr(self, attr)
        if fd < 0:
            with _OPEN_LOCK:
                fd = getattr(self, attr)
                if fd < 0:
                    fd = self.dir.open_file(name)
                    setattr(self, attr, fd)
        return fd

    def still_there(self) -> bool:
        """Is the task this handle pinned not yet reaped?  Its /proc/PID directory
        answers lookups until then (ESRCH after): a read by pid before this says True was
        a read of this task, since a pid is reused only once its task is reaped."""
        try:
            os.stat("stat", dir_fd=self.dir.fd)
        except OSError:
            return False
        return True

    def close(self) -> None:
        for attr in ("mem_fd", "pagemap_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.dir.close()


class ProcfsSource:
    """MemorySource over /proc.  Read-only: it opens nothing for writing, ever.

    Thread safety: calls for one task come from one thread at a time (protocol); the fd
    cache is guarded by a lock and never closes a handle another thread is using; the
    page buffer is per thread.
    """

    def __init__(
        self,
        proc_root: str = PROC_ROOT,
        *,
        self_pid: int | None = _AUTO_SELF,
        scope: Scope | None = None,
        log: logging.Logger | None = None,
        max_open_tasks: int = _DEFAULT_MAX_OPEN_TASKS,
    ) -> None:
        """`self_pid` defaults to the calling process (resolved now, not at import time);
        None skips nobody.  `max_open_tasks` bounds the per-task fd cache (3 fds each)."""
        self.proc_root = proc_root.rstrip("/") or "/"
        self.self_pid = os.getpid() if self_pid == _AUTO_SELF else self_pid
        self.scope = scope
        self.log = log or logging.getLogger(__name__)
        self.max_open_tasks = max(1, max_open_tasks)
        self._lock = threading.Lock()
        self._handles: OrderedDict[TaskId, _TaskHandle] = OrderedDict()
        self._kpf_fd: int | None = None
        self._kpf_state = "unopened"  # unopened | open | unavailable
        self._warned_fallback = False
        # process_vm_readv names the task by pid: only on the real /proc, whose pids are
        # this kernel's; off for good once the kernel refuses it (_VM_READ_REFUSED)
        self.vm_read = self.proc_root == PROC_ROOT and _PROCESS_VM_READV is not None
        self._tls = threading.local()
        # set once present_anon had to use the pagemap-only approximation
        self.fallback_used = False
        self._full_anon: dict[TaskId, set[tuple[int, int]]] = {}  # from the last smaps read
        self._maps: dict[TaskId, tuple[Hashable | None, list[Mapping]]] = {}  # cpu_mark -> VMAs

    # -- helpers ------------------------------------------------------------------

    def _path(self, *parts: object) -> str:
        return "/".join([self.proc_root, *map(str, parts)])

    def _acquire(self, task: TaskId, *, cache: bool) -> _TaskHandle:
        """A handle for `task`: the cached one, or a new one (cached only if `cache`)."""
        with self._lock:
            h = self._handles.get(task)
            if h is not None and not h.task.same_image(task):
                # the task's mm before an exec (its mem and pagemap fds read that mm):
                # this TaskId is the new one
                del self._handles[task]
                if h.busy == 0:
                    h.close()
                h = None
            if h is not None:
                self._handles.move_to_end(task)
                h.busy += 1
                return h
        h = _TaskHandle(*TaskDir.open(task, self.proc_root))
        h.busy = 1
        if not cache:
            return h
        with self._lock:
            old = self._handles.get(task)
            if old is not None and old.task.same_image(task):  # lost a race with another thread: use theirs
                old.busy += 1
                h.busy = 0
                h.close()
                return old
            if old is not None and old.busy == 0:
                old.close()  # another mm of the task (an exec): its user, if any, closes it
            self._handles[task] = h
            self._evict_locked()
        return h

    def _put(self, h: _TaskHandle) -> None:
        with self._lock:
            h.stat0 = None
            h.busy -= 1
            if h.busy <= 0 and self._handles.get(h.task) is not h:
                h.close()  # not cached (or evicted/released while busy)
            else:
                self._evict_locked()

    def _evict_locked(self) -> None:
        """Close least-recently-used idle handles beyond the bound."""
        if len(self._handles) <= self.max_open_tasks:
            return
        for t in list(self._handles):
            if len(self._handles) <= self.max_open_tasks:
                break
            h = self._handles[t]
            if h.busy == 0:
                del self._handles[t]
                h.close()

    def _failed(self, task: TaskId, what: str, exc: Exception) -> TaskFailed:
        """The task's reads failed unexpectedly: forget its fds, say so once, give it up."""
        self._drop(task)
        why = describe_error(exc)
        self.log.warning("%s: dropping the task after an unexpected error in %s: %s", task, what, why)
        return TaskFailed(f"{task} {what}: {why}")

    def _drop(self, task: TaskId) -> None:
        """Forget a cached handle (task gone): closed now, or by its last user."""
        with self._lock:
            h = self._handles.pop(task, None)
            if h is not None and h.busy == 0:
                h.close()

    # -- MemorySource -------------------------------------------------------------

    def tasks(self) -> list[TaskId]:
        """Every user process in scope, in pid order (for_each_process), but zombies:
        their mm is gone (a child its parent has not reaped yet, under churn)."""
        allowed = self.scope.snapshot() if self.scope is not None else None
        out: list[TaskId] = []
        try:
            it = os.scandir(self.proc_root)
        except OSError as e:
            self.log.error("cannot list %s: %s", self.proc_root, e)
            return out
        with it:
            pids = sorted(int(d.name) for d in it if d.name.isdigit())
        if allowed is not None and allowed.members is not None:
            pids = [p for p in pids if p in allowed.members]  # only those can be in scope
        for pid in pids:
            if pid == self.self_pid:
                continue
            st = try_stat(pid, self.proc_root)
            if st is None or st.kthread or not st.alive:
                continue  # exiting or a zombie: no mm (for_each_process's get_task_mm() is NULL)
            if allowed is not None and not allowed.allows(pid, st.comm):
                continue
            out.append(st.task_id)
        return out

    def in_scope(self, pid: int, comm: str | None = None) -> bool:
        """Does the scope admit this pid (the watcher filters hints with it)?"""
        if pid == self.self_pid:
            return False
        if self.scope is None:
            return True
        return self.scope.allows_pid(pid, self.proc_root, comm=comm)

    def ksm_registered(self, task: TaskId) -> bool:
        """Hook for mainline ksmd's scope (lksmfs.engine.ksmd.KsmRegistry): is the mm
        registered with KSM?  /proc/PID/ksm_stat says it cheaply; a kernel without its
        ksm_mergeable line is asked through the mappings' VmFlags.  False once the task
        is gone (a zombie, one reaped meanwhile), unreadable or given up (TaskFailed)."""
        try:
            return self._ksm_registered(task)
        except (ProcessGone, AccessDenied):
            return False

    @_one_task
    def _ksm_registered(self, task: TaskId) -> bool:
        # not cached: asked of tasks that may never get a slot (the crawl's look for a
        # short task's madvise), whose fds nothing would release
        h = self._acquire(task, cache=False)
        try:
            known = h.dir.ksm_registered()
        finally:
            self._put(h)
        if known is not None:
            return known
        return any(m.vm_mergeable for m in self.mappings(task))

    def page_nodes(self, task: TaskId, vpns: np.ndarray) -> np.ndarray:
        """Hook for merge_across_nodes 0 (lksmfs.engine.numa.NodeSource): each page's
        NUMA node, by move_pages(2) (numa_maps where that is refused)."""
        try:
            return numa.page_nodes(task.pid, vpns, self.proc_root)
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                raise ProcessGone(f"{task}: {e.strerror}") from None
            raise AccessDenied(f"{task}: move_pages: {e.strerror}") from None

    def ksm_opt_in(self, task: TaskId) -> tuple[bool, bool]:
        """Hook for mainline's per-process figures (lksmfs.engine.ksmd.KsmOptIn):
        (ksm_merge_any, ksm_mergeable) as /proc/PID/ksm_stat says them; the mappings'
        VmFlags tell mergeable on a kernel without those lines."""
        fields = ksm_stat_fields(task.pid, self.proc_root)
        if "ksm_merge_any" in fields and "ksm_mergeable" in fields:
            return fields["ksm_merge_any"] == "yes", fields["ksm_mergeable"] == "yes"
        try:
            return False, any(m.vm_mergeable for m in self.mappings(task))
        except (ProcessGone, AccessDenied):
            return False, False

    @_one_task
    def stat(self, task: TaskId) -> TaskStat:
        """comm, runtime (schedstat), faults (stat), RssAnon (status) of `task`."""
        h = self._acquire(task, cache=False)
        try:
            st = h.stat0 if h.stat0 is not None else h.dir.stat()
            if not task.same_mm(st):
                raise ProcessGone(f"{task}: pid reused or exec'd")
            runtime_ns = h.dir.runtime_ns(st)
            return TaskStat(
                comm=st.comm,
                runtime_ns=runtime_ns,
                faults=st.minflt + st.majflt,
                anon_pages=h.dir.rss_anon_pages(),
                kthread=st.kthread,
            )
        finally:
            self._put(h)

    @_one_task
    def mappings(self, task: TaskId) -> list[Mapping]:
        """VMAs in address order, from one read of smaps (maps if smaps is missing).

        A task that has not run since its last read (cpu_mark) has the same VMAs: the
        last answer is given again without reading smaps, which walks the task's page
        tables (the crawler's ksm_join and the scanner both ask, every scan).  VMAs whose
        every page a fresh smaps counts as anonymous are remembered: the next
        present_anon() over exactly such a VMA needs no pagemap walk (a fully written
        heap or buffer, the common case)."""
        h = self._acquire(task, cache=True)
        try:
            mark = h.dir.threads_cpu()
            cached = self._maps.get(task)
            if cached is not None and mark is not None and cached[0] == mark:
                return list(cached[1])
            maps = self._mappings_at(h)
        finally:
            self._put(h)
        self._maps[task] = (mark, maps)
        self._full_anon[task] = {(m.start_vpn, m.end_vpn) for m in maps if m.anon_pages == m.npages > 0}
        return list(maps)

    def _mappings_at(self, h: _TaskHandle) -> list[Mapping]:
        try:
            return parse_smaps(h.dir.read("smaps"))
        except FileNotFoundError:  # alive: a kernel without smaps (CONFIG_PROC_PAGE_MONITOR=n)
            return parse_maps(h.dir.read("maps"))

    def _vma_ranges(self, h: _TaskHandle) -> list[tuple[int, int]]:
        """Current [start_vpn, end_vpn) of every VMA (cheap maps re-read)."""
        return [(m.start_vpn, m.end_vpn) for m in parse_maps(h.dir.read("maps"))]

    # -- pages --------------------------------------------------------------------

    def _kpageflags(self) -> int | None:
        """The shared /proc/kpageflags fd, or None if it cannot be read (no root)."""
        if self._kpf_state == "unopened":
            with self._lock:
                if self._kpf_state == "unopened":
                    try:
                        self._kpf_fd = os.open(self._path("kpageflags"), os.O_RDONLY | os.O_CLOEXEC)
                        self._kpf_state = "open"
                    except OSError as e:
                        self._kpf_state = "unavailable"
                        self._warn_fallback(f"/proc/kpageflags unreadable ({e.strerror})")
        return self._kpf_fd if self._kpf_state == "open" else None

    def _warn_fallback(self, why: str) -> None:
        self.fallback_used = True
        if not self._warned_fallback:
            self._warned_fallback = True
            self.log.warning(
                "%s: approximating anonymous pages as present pages with pagemap bit 61 "
                "clear (this counts the shared zero page as anonymous)",
                why,
            )

    def _read_pagemap(self, h: _TaskHandle, start_vpn: int, end_vpn: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_vpn, entries) chunks of the pagemap for [start_vpn, end_vpn)."""
        fd = h.fd("pagemap")
        vpn = start_vpn
        while vpn < end_vpn:
            n = min(_PAGEMAP_CHUNK, end_vpn - vpn)
            with h.dir.errors("pagemap"):
                try:
                    data = os.pread(fd, n * 8, vpn * 8)
                except OSError as e:
                    if e.errno != errno.EIO or not h.dir.alive():
                        raise
                    return  # range vanished under us: nothing present there
            if not data:
                h.dir.ensure_alive("pagemap", "a read of 0 bytes")
                return
            usable = len(data) - len(data) % 8
            yield vpn, np.frombuffer(data, dtype=np.uint64, count=usable // 8)
            vpn += n

    def _flags_of(self, kfd: int, pfns: np.ndarray) -> np.ndarray:
        """kpageflags for each pfn, with one pread per cluster of nearby PFNs."""
        out = np.zeros(len(pfns), dtype=np.uint64)
        if len(pfns) == 0:
            return out
        order = np.argsort(pfns)
        sp = pfns[order]  # sorted, duplicates kept (a KSM page mapped twice)
        breaks = np.flatnonzero(np.diff(sp) > _KPF_GAP) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(sp)]))
        flags_sorted = np.zeros(len(sp), dtype=np.uint64)
        for i0, i1 in zip(starts.tolist(), ends.tolist(), strict=True):
            lo = int(sp[i0])
            hi = int(sp[i1 - 1])
            data = os.pread(kfd, (hi - lo + 1) * 8, lo * 8)
            seg = np.frombuffer(data, dtype=np.uint64, count=len(data) // 8)
            idx = (sp[i0:i1] - np.uint64(lo)).astype(np.intp)
            ok = idx < len(seg)  # PFNs past the end of kpageflags: flags 0
            if ok.all():
                flags_sorted[i0:i1] = seg[idx]
            else:
                part = np.zeros(i1 - i0, dtype=np.uint64)
                part[ok] = seg[idx[ok]]
                flags_sorted[i0:i1] = part
        out[order] = flags_sorted
        return out

    @_one_task
    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        """Sorted uint64 vpns in [start_vpn, end_vpn) that are present anonymous pages."""
        empty = np.zeros(0, dtype=np.uint64)
        if end_vpn <= start_vpn:
            return empty
        full = self._full_anon.get(task)
        if full is not None and (start_vpn, end_vpn) in full:
            full.discard((start_vpn, end_vpn))  # smaps said so a moment ago: once
            return np.arange(start_vpn, end_vpn, dtype=np.uint64)
        h = self._acquire(task, cache=True)
        try:
            # Filled in address order, a pagemap read at a time, into room for every page
            # of the range: only the part written is ever touched (RSS), so a full range
            # costs its pages once - no pieces and their concatenation side by side.  A
            # huge reservation (sanitizers map terabytes) gets room as pages turn up.
            out = np.empty(min(end_vpn - start_vpn, _ROOM_AT_ONCE), dtype=np.uint64)
            n = 0
            for first, ent in self._read_pagemap(h, start_vpn, end_vpn):
                present = np.flatnonzero(ent >> np.uint64(PM_PRESENT_BIT))
                if len(present) == 0:
                    continue
                pe = ent[present]
                # PM_FILE is set exactly for mapped pages that are not PageAnon, and an
                # exclusively mapped page without it is an anonymous page (the zero pages
                # are never exclusive): only the rest needs /proc/kpageflags
                not_file = ((pe >> np.uint64(PM_FILE_OR_SHARED_ANON_BIT)) & np.uint64(1)) == 0
                keep = not_file & (((pe >> np.uint64(PM_MMAP_EXCLUSIVE_BIT)) & np.uint64(1)) == 1)
                check = np.flatnonzero(not_file & ~keep)
                if check.size:
                    keep[check] = self._anon_not_zero(pe[check])
                got = present[keep]
                m = int(got.shape[0])
                if n + m > out.shape[0]:
                    out = np.concatenate([out[:n], np.empty(max(m, n), dtype=np.uint64)])
                np.add(got, first, out=out[n : n + m], casting="unsafe")
                n += m
            if n < out.shape[0] // 2 and n < _PAGEMAP_CHUNK:
                return out[:n].copy()  # a sparse range: give the room back
            return out[:n]
        except ProcessGone:
            self._drop(task)
            raise
        finally:
            self._put(h)

    @_one_task
    def thp_blocks(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        """The PMD-mapped transparent huge pages in [start_vpn, end_vpn), as block numbers
        (vpn // 512): 512 present pages at an aligned address, on 512 contiguous page
        frames from an aligned one that kpageflags calls the head of a THP.  Empty
        without page frame numbers or kpageflags (no root), and before Linux 6.12
        (THP_SPLIT_REMAPS_ZERO)."""
        first = -(-start_vpn // HPAGE_PMD_NR) * HPAGE_PMD_NR
        last = end_vpn // HPAGE_PMD_NR * HPAGE_PMD_NR
        if first >= last or not THP_SPLIT_REMAPS_ZERO:
            return np.zeros(0, dtype=np.int64)
        kfd = self._kpageflags()
        if kfd is None:
            return np.zeros(0, dtype=np.int64)
        h = self._acquire(task, cache=True)
        found: list[int] = []
        try:
            for at, ent in self._read_pagemap(h, first, last):
                nblk = ent.shape[0] // HPAGE_PMD_NR
                if not nblk:
                    continue
                e = ent[: nblk * HPAGE_PMD_NR].reshape(nblk, HPAGE_PMD_NR)
                pfn = (e & PM_PFN_MASK).astype(np.int64)
                ok = ((e >> np.uint64(PM_PRESENT_BIT)).astype(bool).all(axis=1)
                      & (pfn[:, 0] % HPAGE_PMD_NR == 0) & (pfn[:, 0] != 0)
                      & (np.diff(pfn, axis=1) == 1).all(axis=1))
                cand = np.flatnonzero(ok)
                if not cand.size:
                    continue
                try:
                    fl = self._flags_of(kfd, pfn[cand, 0].astype(np.uint64))
                except OSError:
                    return np.zeros(0, dtype=np.int64)
                head = ((fl >> np.uint64(KPF_THP_BIT)) & (fl >> np.uint64(KPF_COMPOUND_HEAD_BIT))
                        & np.uint64(1)).astype(bool)
                found.extend((cand[head] + at // HPAGE_PMD_NR).tolist())
        except ProcessGone:
            self._drop(task)
            raise
        finally:
            self._put(h)
        return np.array(found, dtype=np.int64)

    def _anon_not_zero(self, pe: np.ndarray) -> np.ndarray:
        """Which of these present, not file-backed, shared pages (pagemap entries) are
        anonymous pages and not the zero page: /proc/kpageflags, or - without it - every
        one of them (the approximation `fallback_used` reports)."""
        pfns = pe & PM_PFN_MASK
        have_pfns = bool(pfns.any())
        kfd = self._kpageflags() if have_pfns else None
        if kfd is not None:
            try:
                fl = self._flags_of(kfd, pfns)
            except OSError as e:
                self._kpf_state = "unavailable"
                self._warn_fallback(f"/proc/kpageflags read failed ({e.strerror})")
            else:
                anon = (fl >> np.uint64(KPF_ANON_BIT)) & np.uint64(1)
                zero = (fl >> np.uint64(KPF_ZERO_PAGE_BIT)) & np.uint64(1)
                ok: np.ndarray = (anon == 1) & (zero == 0)
                return ok
        elif not have_pfns:
            self._warn_fallback("page frame numbers read as 0 (no CAP_SYS_ADMIN?)")
        return np.ones(pe.shape[0], dtype=bool)

    def _buffer(self, nbytes: int) -> memoryview:
        """This thread's reusable page buffer, at least `nbytes` long."""
        buf: bytearray | None = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < nbytes:
            # a fresh bytearray: resizing the old one fails while a caller holds a view
            size = max(nbytes, 2 * len(buf) if buf is not None else 0, 64 * PAGE_SIZE)
            buf = bytearray(size)
            self._tls.buf = buf
        return memoryview(buf)

    @property
    def last_missing(self) -> np.ndarray:
        """vpns this thread's last read_pages returned zero-filled (unmapped meanwhile)."""
        got: np.ndarray | None = getattr(self._tls, "missing", None)
        return got if got is not None else np.zeros(0, dtype=np.uint64)

    @_one_task
    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        """Page contents from /proc/PID/mem: one preadv per run of consecutive vpns."""
        v = np.asarray(vpns, dtype=np.uint64)
        n = len(v)
        mv = (self._buffer(n * PAGE_SIZE) if out is None else out)[: n * PAGE_SIZE]
        missing = self._read_into(task, v, mv)
        self._tls.missing = missing if missing.size else None
        return mv

    def _read_into(self, task: TaskId, v: np.ndarray, mv: memoryview) -> np.ndarray:
        """Read pages `v` into `mv`; returns the vpns that had to be zero-filled."""
        n = len(v)
        if n == 0:
            return _NO_VPNS
        h = self._acquire(task, cache=True)
        try:
            # opened whatever reads: the fallback's fd, and the permission check up front
            # (AccessDenied for a task out of bounds, as before any read)
            h.fd("mem")
            by_pid = self.vm_read
            # runs of consecutive vpns: one read each (most calls ask for a single run)
            breaks = np.flatnonzero(np.diff(v) != np.uint64(1)).tolist() if n > 1 else []
            bounds = [0, *(b + 1 for b in breaks), n]
            missing: list[int] = []
            ranges: list[tuple[int, int]] | None = None
            for k in range(len(bounds) - 1):
                ranges = self._read_run(h, mv, v, bounds[k], bounds[k + 1], missing, ranges)
            if by_pid and not h.still_there():
                # the pid may have named another process by the end: nothing read counts
                raise ProcessGone(f"{h.task}: exited while its memory was read")
            return np.array(missing, dtype=np.uint64) if missing else _NO_VPNS
        except ProcessGone:
            self._drop(task)
            raise
        finally:
            self._put(h)

    def _read_at(self, h: _TaskHandle, buf: memoryview, addr: int) -> int:
        """One read of the task's memory at `addr` into `buf`: process_vm_readv(2) where
        the kernel allows it, else a pread of /proc/PID/mem - the same bytes, the same
        short count before a page that cannot be read.  Where the call reads nothing
        (EFAULT) the file is asked: it reads with FOLL_FORCE (a present page of a
        PROT_NONE mapping), and its answer (EIO...) is the one the caller knows."""
        if self.vm_read:
            try:
                return process_vm_read(h.task.pid, buf, addr)
            except OSError as e:
                if e.errno not in _VM_READ_REFUSED:
                    if e.errno != errno.EFAULT:
                        raise  # ESRCH: the caller's "gone" path, as the file's ESRCH
                else:
                    if e.errno != errno.ENOSYS:
                        h.fd("mem")  # AccessDenied if the task itself is out of bounds: the call stays
                    self.vm_read = False
                    self.log.info("process_vm_readv refused (%s): reading /proc/PID/mem instead", e.strerror)
        return os.preadv(h.fd("mem"), [buf], addr)

    def _read_run(
        self,
        h: _TaskHandle,
        mv: memoryview,
        v: np.ndarray,
        i0: int,
        i1: int,
        missing: list[int],
        ranges: list[tuple[int, int]] | None,
    ) -> list[tuple[int, int]] | None:
        """Read pages v[i0:i1] (consecutive vpns) into mv; handle a mapping that vanished.

        A short read or EIO means the page at that offset cannot be read: either the task
        is exiting (ProcessGone) or that part of the address space was unmapped while we
        looked.  Then maps is re-read (once per read_pages call) and pages no longer in any
        VMA are zero-filled and recorded in `last_missing`; a page still mapped that cannot
        be read twice in a row is treated the same way.
        """
        pos = i0 * PAGE_SIZE
        end = i1 * PAGE_SIZE
        addr = int(v[i0]) << PAGE_SHIFT
        retried_at = -1
        while pos < end:
            with h.dir.errors("mem"):
                try:
                    got = self._read_at(h, mv[pos:end], addr)
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EFAULT) or not h.dir.alive():
                        raise
                    got = 0
            if got > 0:
                pos += got
                addr += got
                continue
            # the page at `addr` is unreadable (EIO, EFAULT or a 0-byte read)
            h.dir.ensure_alive("mem", "an unreadable page")
            if ranges is None:
                ranges = self._vma_ranges(h)
                if not ranges:  # mm already torn down
                    raise ProcessGone(f"{h.task}: no mappings left")
            page_off = pos % PAGE_SIZE
            page_start = pos - page_off
            vpn = addr >> PAGE_SHIFT
            mapped = any(a <= vpn < b for a, b in ranges)
            if mapped and retried_at != page_start:
                retried_at = page_start
                continue  # one retry: the mapping may have just been replaced
            mv[pos : page_start + PAGE_SIZE] = bytes(page_start + PAGE_SIZE - pos)
            missing.append(vpn)
            pos = page_start + PAGE_SIZE
            addr = (vpn + 1) << PAGE_SHIFT
        return ranges

    # -- lifetime -----------------------------------------------------------------

    @_one_task
    def cpu_mark(self, task: TaskId) -> Hashable | None:
        """(tid, sum_exec_runtime) of every thread, from /proc/PID/task/*/schedstat."""
        h = self._acquire(task, cache=True)
        try:
            return h.dir.threads_cpu()
        finally:
            self._put(h)

    def release(self, task: TaskId) -> None:
        """Close the task's fds (the engine dropped its mm_slot)."""
        self._full_anon.pop(task, None)
        self._maps.pop(task, None)
        self._drop(task)

    @property
    def kpageflags_open(self) -> bool:
        """Whether /proc/kpageflags is open (only once some page needed a lookup)."""
        return self._kpf_fd is not None

    def open_tasks(self) -> int:
        """How many tasks have cached fds (for tests and stats)."""
        with self._lock:
            return len(self._handles)

    def close(self) -> None:
        """Close every fd we hold."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            kfd, self._kpf_fd = self._kpf_fd, None
            if self._kpf_state == "open":
                self._kpf_state = "unopened"
        for h in handles:
            h.close()
        if kfd is not None:
            try:
                os.close(kfd)
            except OSError:
                pass

    def __enter__(self) -> ProcfsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
