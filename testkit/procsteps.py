"""Steps of a task's handling through /proc, and a task dying at a chosen one.

`ProcSteps` stands in for the `os` module of lksmfs.system.proc and
lksmfs.sources.procfs (a test monkeypatches their `os`): every call through which they
touch the files of one task - opening one (by path, or relative to its pinned
directory), reading one, listing its task/ directory, pread on pagemap, preadv on mem,
process_vm_readv(2) of its memory (lksmfs.sources.procfs.process_vm_read) - is a
step, recorded in `steps`.  At step `at` the task dies: `die()` runs first (kill a
real process and maybe reap it, or turn a fake tree's task into a zombie), then the
call either goes to the kernel as it is, which answers what a dead task answers (`kind`
None), or gets a made-up answer:

- "ESRCH", "ENOENT", "EIO": the call fails with that errno;
- "empty": it reads nothing (0 bytes, an empty listing);
- "truncated": it reads half of what it would.

With a made-up death, a task `die()` marks "reaped" answers ESRCH to reads of the fds
already open, and lists nothing (a fake tree's files stay readable once unlinked).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.sources import procfs
from lksmfs.sources.base import TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.system import proc

_PROCESS_VM_READ = procfs.process_vm_read
ERRNO_OF = {"ESRCH": errno.ESRCH, "ENOENT": errno.ENOENT, "EIO": errno.EIO}


class ProcSteps:
    """The `os` module, with task `pid` of the tree at `root` dying at step `at`."""

    def __init__(self, root: str, pid: int, at: int | None, die: Callable[[], None], kind: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.pid = pid
        self.at = at
        self.die = die
        self.kind = kind
        self.steps: list[str] = []  # what each step was (a recording run's answer)
        self.dead = ""  # set once the task died: "reaped", "zombie" (die() says) or "dead"
        self.fds: dict[int, str] = {}  # the task's open fds -> what they are

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _fire(self, what: str) -> bool:
        """Count a step; True if it is the one where the task dies (it is dead then)."""
        if self.dead:
            return False
        self.steps.append(what)
        if len(self.steps) - 1 != self.at:
            return False
        self.die()
        self.dead = self.dead or "dead"
        return True

    def _fail(self) -> None:
        if self.kind in ERRNO_OF:
            code = ERRNO_OF[self.kind]
            raise OSError(code, os.strerror(code))

    def _made_up_reaped(self) -> bool:
        return self.kind is not None and self.dead == "reaped"

    def _mine(self, path: Any, dir_fd: int | None) -> bool:
        if dir_fd is not None:
            return dir_fd in self.fds
        p, base = os.fspath(path), f"{self.root}/{self.pid}"
        return isinstance(p, str) and (p == base or p.startswith(base + "/"))

    # -- the calls ------------------------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        mine = self._mine(path, dir_fd)
        if mine and self._fire(f"open {path}"):
            self._fail()
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        if mine:
            self.fds[fd] = str(path)
        return fd

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        os.close(fd)

    def _read(self, fd: int, what: str, real: Callable[[], Any], empty: Any, half: Callable[[Any], Any]) -> Any:
        if fd not in self.fds:
            return real()
        if self._made_up_reaped():
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        if not self._fire(f"{what} {self.fds[fd]}") or self.kind is None:
            return real()
        self._fail()
        if self.kind == "empty":
            return empty
        return half(real())

    def read(self, fd: int, n: int) -> bytes:
        got: bytes = self._read(fd, "read", lambda: os.read(fd, n), b"", lambda b: b[: len(b) // 2])
        return got

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        got: bytes = self._read(fd, "pread", lambda: os.pread(fd, n, offset), b"", lambda b: b[: len(b) // 2])
        return got

    def preadv(self, fd: int, buffers: list[Any], offset: int) -> int:
        got: int = self._read(fd, "preadv", lambda: os.preadv(fd, buffers, offset), 0, lambda n: n // 2)
        return got

    def process_vm_read(self, pid: int, buf: memoryview, addr: int) -> int:
        """procfs.process_vm_read's stand-in: a read of the task's memory by pid."""
        real = _PROCESS_VM_READ
        if pid != self.pid:
            return real(pid, buf, addr)
        if self._made_up_reaped():
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        if not self._fire(f"process_vm_readv {self.root}/{pid}/mem") or self.kind is None:
            return real(pid, buf, addr)
        self._fail()
        if self.kind == "empty":
            return 0
        return real(pid, buf, addr) // 2

    def listdir(self, fd: Any) -> list[str]:
        if not isinstance(fd, int) or fd not in self.fds:
            return os.listdir(fd)
        if self._made_up_reaped():
            return []
        if self._fire(f"listdir {self.fds[fd]}") and self.kind is not None:
            self._fail()
            return []  # empty or truncated: nothing listed
        return os.listdir(fd)


def use(monkeypatch: pytest.MonkeyPatch, steps: ProcSteps) -> None:
    """From now on (until the test ends) the modules that read /proc go through `steps`."""
    for mod in (proc, procfs):
        monkeypatch.setattr(mod, "os", steps)
    monkeypatch.setattr(procfs, "process_vm_read", steps.process_vm_read)


def full_scans(src: ProcfsSource, policy: str, n: int, joined: set[TaskId] | None = None,
               self_pid: int | None = None) -> Ksm:
    """`n` full scans of `src` by a fresh engine, the source closed after; `joined`
    collects every task that got a slot (whether a task that died had joined)."""
    ksm = Ksm(src, policy=policy, self_pid=self_pid)
    if joined is not None:
        alloc = ksm.mm.alloc

        def spy(task: TaskId, *args: Any, **kwargs: Any) -> Any:
            joined.add(task)
            return alloc(task, *args, **kwargs)

        ksm.mm.alloc = spy  # type: ignore[method-assign]
    for _ in range(n):
        ksm.full_scan()
    src.close()
    return ksm
