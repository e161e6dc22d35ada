"""Shared fixtures for live tests: real child processes with known memory, real cgroups.

Everything here cleans up after itself even when a test fails: children are killed and
reaped, cgroups are thawed, emptied and removed.  Tests reach the helpers through
fixtures (`live`, `spawn_mem_child`, ...), not by importing this module: the test
directories are not packages, so `conftest` is not a reliable import name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from fuse_fixtures import Child, Mounts, skip_unless_fuse
from waiting import wait_until  # noqa: F401  (re-exported to the tests)

from lksmfs.system import cgroups

PAGE = 4096
V1_FREEZER = cgroups.V1_FREEZER
V2_ROOT = cgroups.V2_MOUNTS[0]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("live test needs root (reads other processes' /proc/PID/mem)")


# A child that maps memory with known contents, reports the addresses as one JSON line
# and then waits for stdin to close.  Spec (argv[1], JSON):
#   private: list of byte values, one page each, written into a MAP_PRIVATE|ANON region
#   zero:    pages after them that are only read (so they map the shared zero page)
#   untouched: pages after those that are never touched (not present)
#   shared:  byte values written into a MAP_SHARED|ANON region (must never be scanned)
#   comm:    name to set in /proc/self/comm
_CHILD = r"""
import json, mmap, os, sys, ctypes
spec = json.loads(sys.argv[1])
with open("/proc/self/comm", "w") as f:
    f.write(spec["comm"])
priv_n = len(spec["private"]) + spec["zero"] + spec["untouched"]
priv = mmap.mmap(-1, max(priv_n, 1) * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
# no THP: a huge page would make untouched neighbours present, the zero page huge
priv.madvise(mmap.MADV_NOHUGEPAGE)
for i, b in enumerate(spec["private"]):
    priv[i * 4096:(i + 1) * 4096] = bytes([b]) * 4096
z = 0
for i in range(len(spec["private"]), len(spec["private"]) + spec["zero"]):
    z += priv[i * 4096]
sh_n = len(spec["shared"])
shared = mmap.mmap(-1, max(sh_n, 1) * 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i, b in enumerate(spec["shared"]):
    shared[i * 4096:(i + 1) * 4096] = bytes([b]) * 4096
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(json.dumps({"pid": os.getpid(), "private": addr(priv), "shared": addr(shared),
                  "zero_sum": z}), flush=True)
sys.stdin.read()
"""


@dataclass
class MemChild:
    """A running child with known memory; `private`/`shared` are region start addresses."""

    proc: subprocess.Popen[str]
    pid: int
    private: int
    shared: int
    spec: dict[str, object] = field(default_factory=dict)

    @property
    def private_vpn(self) -> int:
        return self.private // PAGE

    @property
    def shared_vpn(self) -> int:
        return self.shared // PAGE

    def stop(self) -> None:
        """Kill and reap (idempotent)."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()


SpawnFn = Callable[..., MemChild]


@pytest.fixture
def spawn_mem_child() -> Iterator[SpawnFn]:
    """Factory: spawn_mem_child(private=[..], zero=1, untouched=1, shared=[..], comm=..)."""
    require_root()
    children: list[MemChild] = []

    def spawn(
        private: list[int] | None = None,
        *,
        zero: int = 0,
        untouched: int = 0,
        shared: list[int] | None = None,
        comm: str = "lksmfs-child",
    ) -> MemChild:
        spec: dict[str, object] = {
            "private": private or [],
            "zero": zero,
            "untouched": untouched,
            "shared": shared or [],
            "comm": comm,
        }
        p = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        child = MemChild(p, p.pid, 0, 0, spec)
        children.append(child)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            child.stop()
            raise RuntimeError("memory child died before reporting")
        info = json.loads(line)
        child.pid, child.private, child.shared = info["pid"], info["private"], info["shared"]
        return child

    try:
        yield spawn
    finally:
        for c in children:
            c.stop()


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Factory for plain `sleep` children (cheap tasks to freeze), all killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["sleep", "300"])
        procs.append(p)
        return p

    try:
        yield spawn
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


CgroupFactory = Callable[[], str]


def _cgroup_factory(root: str, v2: bool) -> Iterator[CgroupFactory]:
    """Fresh groups lksmfs-test-XXXX under `root`; each one, with whatever a test left in
    it, is thawed, emptied into `root` and removed at the end."""
    require_root()
    if not os.path.exists(os.path.join(root, "cgroup.procs")):
        pytest.skip(f"no cgroup {'v2' if v2 else 'v1 freezer'} hierarchy at {root}")
    made: list[str] = []

    def make() -> str:
        path = os.path.join(root, f"lksmfs-test-{uuid.uuid4().hex[:10]}")
        os.mkdir(path)
        made.append(path)
        if v2 and not os.path.exists(os.path.join(path, "cgroup.freeze")):
            pytest.skip("cgroup v2 without cgroup.freeze")
        return path

    try:
        yield make
    finally:
        left = [g for p in made for g in cgroups.remove_tree(p, v2, evacuate_to=root, timeout=5.0)]
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def v1_freezer_cgroup() -> Iterator[CgroupFactory]:
    """Factory of fresh cgroup v1 freezer groups; every one is thawed and removed."""
    yield from _cgroup_factory(V1_FREEZER, False)


@pytest.fixture
def v2_cgroup() -> Iterator[CgroupFactory]:
    """Factory of fresh cgroup v2 groups (cgroup.freeze capable); removed at the end."""
    yield from _cgroup_factory(V2_ROOT, True)


def move_to_cgroup(group: str, pid: int) -> None:
    cgroups.attach(group, pid)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class LiveHelpers:
    """Plain helpers handed to tests by the `live` fixture."""

    page: int = PAGE
    v1_freezer: str = V1_FREEZER
    v2_root: str = V2_ROOT

    @staticmethod
    def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> bool:
        return wait_until(pred, timeout)

    @staticmethod
    def move_to_cgroup(group: str, pid: int) -> None:
        move_to_cgroup(group, pid)

    @staticmethod
    def open_fd_count() -> int:
        return open_fd_count()

    @staticmethod
    def write(path: str, value: str) -> None:
        _write(path, value)


@pytest.fixture
def live() -> LiveHelpers:
    """Helpers for live tests (root required)."""
    require_root()
    return LiveHelpers()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    """Daemons mounted by the test, always unmounted."""
    skip_unless_fuse()
    with Mounts() as m:
        yield m


@pytest.fixture
def child() -> Iterator[Child]:
    """A live process with 64 pages for the daemon to scan."""
    with Child(64) as c:
        yield c
