"""The kernel's mm lifecycle hooks, from user space: ksm_exit() and ksm_madvise().

In the kernel, exit_mm() calls ksm_exit() as the task exits - before its parent reaps
the zombie - and an exec drops the old mm the same way (exec_mmap -> mmput); madvise
(MADV_MERGEABLE) calls __ksm_enter() at once.  LKSM's counters follow at that moment:
scanning_process drops at an exit (`ksm_nr_added_process--` in __ksm_exit) and rises
at a madvise (`ksm_nr_added_process++` in __ksm_enter_alloc_slot).  The daemon learns
of these here, in one thread, as they happen:

- exit:    a pidfd per registered task (pidfd_open(2), Linux 5.3+), readable once the
           process has exited - a zombie included - woken through epoll;
- exec:    /proc/PID/stat's image (TaskId.image: start_code, end_code, start_stack) no
           longer the registered one: the old mm exits, the new one is a newcomer at
           the next crawl (ksm_join: it has no MMF_VM_MERGEABLE);
- fallback: every `poll_interval`, each watched task's stat (gone, a zombie, another
           start time or image): the exit path without pidfds, and exec always;
- madvise: every `poll_interval`, /proc/PID/ksm_stat (`ksm_mergeable: yes` or
           `ksm_merge_any: yes`) of every process not watched; the daemon checks the
           scope of those that say yes.

The callbacks run in this thread; the daemon takes the engine lock in them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from lksmfs.system.proc import PROC_ROOT, TaskId, ksm_registered, pids, try_stat
from lksmfs.system.threads import start_thread

log = logging.getLogger(__name__)

# How often exec and madvise are looked for (and exits, without pidfds).
DEFAULT_POLL_INTERVAL_S = 0.5

_Key = tuple[int, int, int]


def _key(task: TaskId) -> _Key:
    """An mm: the task and its image (TaskId's equality leaves the image out)."""
    return task.pid, task.start_time, task.image


def pidfd_supported() -> bool:
    """Can this process open pidfds (Linux 5.3+, Python 3.9+, not refused by seccomp)?"""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    os.close(fd)
    return True


class LifecycleWatcher:
    """Watches the registered tasks for exit and exec, and the others for madvise."""

    def __init__(
        self,
        *,
        watched: Callable[[], list[TaskId]],
        on_exit: Callable[[TaskId], None],
        on_madvise: Callable[[int], None] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        proc_root: str = PROC_ROOT,
        use_pidfd: bool | None = None,
    ) -> None:
        """`watched`: the tasks whose exit matters (registered slots, frozen hints);
        `on_madvise(pid)`: a process not watched has madvised (None: not looked for)."""
        self.watched = watched
        self.on_exit = on_exit
        self.on_madvise = on_madvise
        self.poll_interval = poll_interval
        self.proc_root = proc_root
        self.use_pidfd = pidfd_supported() if use_pidfd is None else use_pidfd
        self.errors = 0
        # by (pid, start time, image): TaskId's equality leaves the image (the mm) out
        self._fds: dict[_Key, int] = {}  # pidfd per watched mm
        self._by_fd: dict[int, TaskId] = {}
        self._told: set[_Key] = set()  # exits already reported
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._woken = False

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = start_thread("lifecycle", self._run)

    def stop(self, timeout: float = 5.0) -> None:
        t, self._thread = self._thread, None
        if t is None:
            return
        self._stop.set()
        self.wake()
        t.join(timeout)
        for fd in list(self._by_fd):
            self._close(fd)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def wake(self) -> None:
        """Look at the watched set now (a prepare registered tasks, say)."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_poll:
                    self.poll_once()
                    next_poll = time.monotonic() + self.poll_interval
                elif self._woken:
                    self._sync(full=False)
                self._woken = False
                self._wait(max(0.0, next_poll - time.monotonic()))
            except Exception:  # never let the thread die of one task: log, back off, go on
                self.errors += 1
                log.exception("lifecycle watcher iteration failed")
                self._stop.wait(self.poll_interval)

    # -- one round ----------------------------------------------------------------------

    def poll_once(self) -> None:
        """One full round: the pidfds synced with the watched set, every watched task's
        stat (exit, exec), the candidates' madvise.  Also for tests without the thread."""
        self._sync(full=True)

    def _sync(self, full: bool) -> None:
        """Pidfds for the tasks newly watched (their stat checked once they have one);
        with `full`, the stat of every watched task and the candidates' ksm_stat."""
        watched = {_key(t): t for t in self.watched()}
        self._told &= watched.keys()
        for key in [k for k in self._fds if k not in watched]:
            self._close(self._fds[key])
        for key, task in watched.items():
            if key in self._told:
                continue
            new = key not in self._fds
            if new and self.use_pidfd and self._epoll is not None:
                self._open(task)
            if (full or new) and not self._same_mm(task):
                self._exited(task)
        if not full or self.on_madvise is None:
            return
        mine = {t.pid for t in watched.values()}
        for pid in pids(self.proc_root):
            if pid not in mine and ksm_registered(pid, self.proc_root):
                self.on_madvise(pid)

    def _wait(self, timeout: float) -> None:
        """Until a pidfd says its process exited, a wake-up, or `timeout`."""
        if self._epoll is None:
            self._stop.wait(timeout)
            return
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            return
        for fd, _ in events:
            if fd == self._wake_r:
                self._woken = True
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except BlockingIOError:
                    pass
                continue
            task = self._by_fd.get(fd)
            if task is not None:
                self._close(fd)
                self._exited(task)

    def _same_mm(self, task: TaskId) -> bool:
        """Is the task still this mm: not gone, not a zombie, no pid reuse, no exec?"""
        st = try_stat(task.pid, self.proc_root)
        return st is not None and st.alive and task.same_mm(st)

    def _exited(self, task: TaskId) -> None:
        if _key(task) in self._told:
            return
        self._told.add(_key(task))
        fd = self._fds.get(_key(task))
        if fd is not None:
            self._close(fd)
        self.on_exit(task)

    def _open(self, task: TaskId) -> None:
        """A pidfd for `task` (checked to be the same process by _same_mm() after)."""
        try:
            fd = os.pidfd_open(task.pid)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                log.warning("pidfd_open refused (%s): exits are polled every %.1f s", e, self.poll_interval)
                self.use_pidfd = False
            return  # ESRCH: gone, which _same_mm() tells
        self._fds[_key(task)] = fd
        self._by_fd[fd] = task
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)

    def _close(self, fd: int) -> None:
        task = self._by_fd.pop(fd, None)
        if task is not None:
            self._fds.pop(_key(task), None)
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        try:
            os.close(fd)
        except OSError:
            pass
