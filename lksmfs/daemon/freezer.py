"""Freezer watcher: turns cgroup freezes into LKSM's frozen/thawed task hints.

In an LKSM kernel, freeze_task() and __thaw_task() call lksm_hint() for each task, and
the crawler runs a partial scan over the frozen ones (a frozen app's memory is still,
so it is the cheapest to merge).  User space sees the same events as cgroup state:

- cgroup v1 freezer:  `freezer.state` reads FROZEN (FREEZING is not frozen yet).  It
  cannot be polled, so it is re-read every `poll_interval` through a kept-open fd.
- cgroup v2:          `cgroup.events` has `frozen 1`.  kernfs signals inotify IN_MODIFY
  on it, so these groups cost nothing while idle; without inotify they are polled.

Every transition hints every task of the group (cgroup.procs, identity via start time).
A task may be frozen for several reasons at once (a v1 group and a v2 group, or SIGSTOP
with `treat_sigstop_as_frozen`): hints are reference counted per task, so the engine
hears `frozen` when the first reason appears and `thawed` when the last one goes.
Cgroup trees are re-walked every `rewalk_interval` to find new and removed groups and
tasks that moved in or out of a frozen group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lksmfs.sources.scope import Scope, ScopeSnapshot
from lksmfs.system import cgroups
from lksmfs.system.proc import PROC_ROOT, StatFields, TaskId, pids, try_stat
from lksmfs.system.threads import start_thread

__all__ = ["FreezerWatcher", "Hint"]

Hint = Callable[[TaskId, bool], None]

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")
_SIGSTOP_KEY = "<sigstop>"
_MAX_KEPT_FDS = 512  # beyond this many groups, state files are opened per read
_AUTO_SELF = -1


class _Inotify:
    """Minimal inotify through libc (no dependency): watch files for IN_MODIFY."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd: int = fd

    def add(self, path: str) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), IN_MODIFY))
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return wd

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)  # fails harmlessly if the kernel already dropped it

    def read(self) -> tuple[set[int], bool]:
        """(watch descriptors with news, queue overflowed)."""
        wds: set[int] = set()
        overflow = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, ln = _EVENT.unpack_from(data, off)
                off += _EVENT.size + ln
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                elif not mask & IN_IGNORED:
                    wds.add(wd)
        return wds, overflow

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Group:
    """One cgroup with a freeze state: where to read it and whom we hinted frozen."""

    path: str
    v2: bool
    fd: int = -1
    wd: int = -1
    frozen: bool = False
    members: set[TaskId] = field(default_factory=set)

    @property
    def state_file(self) -> str:
        return cgroups.state_file(self.path, self.v2)


class _GroupGone(Exception):
    pass


class FreezerWatcher:
    """A daemon thread that calls `on_hint(task, frozen)` on freezer transitions.

    `on_hint` runs in the watcher thread, never with the watcher's lock held; an
    exception from it is logged and the watcher carries on.
    """

    def __init__(
        self,
        on_hint: Hint,
        *,
        v1_roots: Iterable[str] | None = None,
        v2_roots: Iterable[str] | None = None,
        proc_root: str = PROC_ROOT,
        treat_sigstop_as_frozen: bool = False,
        poll_interval: float = 0.05,
        rewalk_interval: float = 1.0,
        sigstop_interval: float = 0.2,
        scope: Scope | None = None,
        self_pid: int | None = _AUTO_SELF,
        report_initial: bool = True,
        use_inotify: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        """Roots default to the freezer/cgroup2 mounts in /proc/self/mountinfo.

        `report_initial`: groups already frozen when first seen hint their tasks too
        (a group frozen before the daemon started is the best thing to scan).
        """
        self.on_hint = on_hint
        self.proc_root = proc_root.rstrip("/") or "/"
        if v1_roots is None or v2_roots is None:
            auto_v1, auto_v2 = cgroups.discover(f"{self.proc_root}/self/mountinfo")
        self.v1_roots = list(v1_roots) if v1_roots is not None else auto_v1
        self.v2_roots = list(v2_roots) if v2_roots is not None else auto_v2
        self.treat_sigstop_as_frozen = treat_sigstop_as_frozen
        self.poll_interval = poll_interval
        self.rewalk_interval = rewalk_interval
        self.sigstop_interval = sigstop_interval
        self.scope = scope
        self.self_pid = os.getpid() if self_pid == _AUTO_SELF else self_pid
        self.report_initial = report_initial
        self.use_inotify = use_inotify
        self.log = log or logging.getLogger(__name__)

        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self._frozen_by: dict[TaskId, set[str]] = {}
        self._inotify: _Inotify | None = None
        self._by_wd: dict[int, _Group] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = -1
        self._wake_w = -1
        self._next_walk = 0.0
        self._next_sigstop = 0.0
        self._walked_once = False
        self._cpu_s = 0.0
        self._scope_snap: ScopeSnapshot | None = None
        self.errors = 0

    # -- public -------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.use_inotify and self.v2_roots:
                try:
                    self._inotify = _Inotify()
                except (OSError, AttributeError) as e:
                    self.log.warning("inotify unavailable (%s): polling cgroup.events", e)
            self._thread = start_thread("freezer", self._run)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the thread, then close every fd (idempotent)."""
        with self._lock:
            t = self._thread
            self._thread = None
        if t is None:
            return
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        t.join(timeout)
        with self._lock:
            for g in self._groups.values():
                self._close_group(g)
            self._groups.clear()
            self._by_wd.clear()
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            self._walked_once = False
            self._next_walk = 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def frozen_tasks(self) -> set[TaskId]:
        """Tasks currently hinted frozen."""
        with self._lock:
            return set(self._frozen_by)

    def groups(self) -> dict[str, bool]:
        """Every watched cgroup directory and whether it is frozen."""
        with self._lock:
            return {p: g.frozen for p, g in self._groups.items()}

    def cpu_seconds(self) -> float:
        """CPU time the watcher thread has used so far (thread_time)."""
        return self._cpu_s

    def poll_once(self, *, force_walk: bool = False) -> None:
        """One synchronous round (walk if due, read states): for tests without the thread."""
        if force_walk:
            self._next_walk = 0.0
        hints = self._round(time.monotonic(), inotify_wds=None, poll_v2=True)
        self._emit(hints)

    # -- thread -------------------------------------------------------------------

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:  # never let the thread die: log, back off, go on
                self.errors += 1
                self.log.exception("freezer watcher iteration failed")
                self._stop.wait(max(self.poll_interval, 0.5))
            self._cpu_s = time.thread_time() - t0

    def _iteration(self) -> None:
        ino = self._inotify
        now = time.monotonic()
        wds: set[int] | None = None
        poll_v2 = ino is None
        # wait for: inotify news, the next v1 poll, the next walk, or stop()
        need_poll = poll_v2 or any(not g.v2 or g.wd < 0 for g in self._groups.values())
        deadline = self._next_walk
        if self.treat_sigstop_as_frozen:
            deadline = min(deadline, self._next_sigstop)
        timeout = max(0.0, deadline - now)
        if need_poll and self._groups:
            timeout = min(timeout, self.poll_interval)
        if self._walked_once:
            rlist = [self._wake_r] + ([ino.fd] if ino is not None else [])
            ready, _, _ = select.select(rlist, [], [], timeout)
            if self._stop.is_set():
                return
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 64)
                except OSError:
                    pass
            if ino is not None and ino.fd in ready:
                wds, overflow = ino.read()
                if overflow:
                    poll_v2 = True
        hints = self._round(time.monotonic(), inotify_wds=wds, poll_v2=poll_v2)
        self._emit(hints)

    def _round(self, now: float, *, inotify_wds: set[int] | None, poll_v2: bool) -> list[tuple[TaskId, bool]]:
        """Walk if due, read the states worth reading; return the hints to send."""
        hints: list[tuple[TaskId, bool]] = []
        with self._lock:
            self._scope_snap = None
            walked = False
            if now >= self._next_walk:
                self._walk(hints)
                self._next_walk = now + self.rewalk_interval
                walked = True
            for g in list(self._groups.values()):
                if g.v2 and g.wd >= 0 and not poll_v2 and not walked:
                    if inotify_wds is None or g.wd not in inotify_wds:
                        continue
                self._refresh(g, hints)
            if self.treat_sigstop_as_frozen and now >= self._next_sigstop:
                self._scan_sigstop(hints)
                self._next_sigstop = now + self.sigstop_interval
            self._walked_once = True
        return hints

    def _emit(self, hints: list[tuple[TaskId, bool]]) -> None:
        for task, frozen in hints:
            try:
                self.on_hint(task, frozen)
            except Exception:
                self.errors += 1
                self.log.exception("on_hint(%s, %s) failed", task, frozen)

    # -- groups -------------------------------------------------------------------

    def _walk(self, hints: list[tuple[TaskId, bool]]) -> None:
        """Find cgroups added/removed since the last walk; resync frozen members."""
        found: dict[str, bool] = {}
        for roots, v2 in ((self.v1_roots, False), (self.v2_roots, True)):
            for root in roots:
                for d in cgroups.subgroups(root):
                    found.setdefault(d, v2)
        for path in list(self._groups):
            if path not in found:
                self._remove_group(self._groups[path], hints)
        for path, v2 in found.items():
            g = self._groups.get(path)
            if g is None:
                g = _Group(path, v2)
                if not self._add_group(g):
                    continue
                self._refresh(g, hints, initial=not self._walked_once)
            elif g.frozen:
                self._resync_members(g, hints)

    def _add_group(self, g: _Group) -> bool:
        """Open the group's state file (and inotify watch for v2); False if not a cgroup."""
        if len(self._groups) < _MAX_KEPT_FDS:
            try:
                g.fd = os.open(g.state_file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        elif not os.path.exists(g.state_file):
            return False
        if g.v2 and self._inotify is not None:
            try:
                g.wd = self._inotify.add(g.state_file)
                self._by_wd[g.wd] = g
            except OSError as e:
                self.log.debug("inotify watch on %s failed: %s", g.state_file, e)
        self._groups[g.path] = g
        return True

    def _close_group(self, g: _Group) -> None:
        if g.fd >= 0:
            try:
                os.close(g.fd)
            except OSError:
                pass
            g.fd = -1
        if g.wd >= 0:
            self._by_wd.pop(g.wd, None)
            if self._inotify is not None:
                self._inotify.remove(g.wd)
            g.wd = -1

    def _remove_group(self, g: _Group, hints: list[tuple[TaskId, bool]]) -> None:
        """The cgroup is gone (only an empty one can be removed): it freezes nobody now."""
        self._groups.pop(g.path, None)
        self._close_group(g)
        for t in g.members:
            self._unclaim(t, g.path, hints)
        g.members.clear()

    def _read_state(self, g: _Group) -> bool:
        """Is the group frozen right now?  Raises _GroupGone if it disappeared."""
        try:
            if g.fd >= 0:
                data = os.pread(g.fd, 256, 0)
            else:
                with open(g.state_file, "rb") as f:
                    data = f.read(256)
        except OSError as e:
            raise _GroupGone(g.path) from e
        return cgroups.parse_state(data, g.v2) == cgroups.FROZEN

    def _refresh(self, g: _Group, hints: list[tuple[TaskId, bool]], *, initial: bool = False) -> None:
        """Read the group's state and hint its tasks on a transition."""
        try:
            frozen = self._read_state(g)
        except _GroupGone:
            self._remove_group(g, hints)
            return
        if frozen == g.frozen:
            return
        g.frozen = frozen
        if frozen:
            if initial and not self.report_initial:
                return
            self._resync_members(g, hints)
        else:
            # __thaw_task for everything we froze plus whoever is in the group now
            for t in g.members | self._group_tasks(g):
                self._unclaim(t, g.path, hints)
            g.members.clear()

    def _resync_members(self, g: _Group, hints: list[tuple[TaskId, bool]]) -> None:
        """A frozen group's members: hint newcomers frozen, leavers thawed."""
        now = self._group_tasks(g)
        for t in sorted(now - g.members):
            self._claim(t, g.path, hints)
        for t in sorted(g.members - now):
            self._unclaim(t, g.path, hints)
        g.members = now

    def _group_tasks(self, g: _Group) -> set[TaskId]:
        """Tasks in the cgroup that we may hint (not us, not kthreads, in scope)."""
        members = (self._task(pid) for pid in cgroups.procs(g.path))
        return {t for t in members if t is not None}

    def _task(self, pid: int, st: StatFields | None = None) -> TaskId | None:
        if pid == self.self_pid:
            return None
        if st is None:
            st = try_stat(pid, self.proc_root)
        if st is None or st.kthread:
            return None
        if self.scope is not None and not self.scope.unrestricted:
            if self._scope_snap is None:
                self._scope_snap = self.scope.snapshot()
            if not self._scope_snap.allows(pid, st.comm):
                return None
        return st.task_id

    # -- reference-counted hints ----------------------------------------------------

    def _claim(self, t: TaskId, key: str, hints: list[tuple[TaskId, bool]]) -> None:
        keys = self._frozen_by.setdefault(t, set())
        first = not keys
        keys.add(key)
        if first:
            hints.append((t, True))

    def _unclaim(self, t: TaskId, key: str, hints: list[tuple[TaskId, bool]]) -> None:
        keys = self._frozen_by.get(t)
        if keys is None or key not in keys:
            return
        keys.discard(key)
        if keys:
            return
        del self._frozen_by[t]
        st = try_stat(t.pid, self.proc_root)
        if st is not None and st.task_id == t:  # a dead task needs no thaw: ksm_exit handles it
            hints.append((t, False))

    # -- SIGSTOP ------------------------------------------------------------------

    def _scan_sigstop(self, hints: list[tuple[TaskId, bool]]) -> None:
        """Tasks in state T count as frozen: their memory is as still as a frozen one's."""
        stopped: set[TaskId] = set()
        try:
            listed = pids(self.proc_root)
        except OSError:
            return
        for pid in listed:
            st = try_stat(pid, self.proc_root)
            if st is None or st.state != "T":
                continue
            t = self._task(pid, st)
            if t is not None:
                stopped.add(t)
        before = {t for t, k in self._frozen_by.items() if _SIGSTOP_KEY in k}
        for t in sorted(stopped - before):
            self._claim(t, _SIGSTOP_KEY, hints)
        for t in sorted(before - stopped):
            self._unclaim(t, _SIGSTOP_KEY, hints)
