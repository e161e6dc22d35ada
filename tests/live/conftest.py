"""Shared fixtures for live tests: real child processes with known memory, real cgroups.

Everything here cleans up after itself even when a test fails: children are killed and
reaped, cgroups are thawed, emptied and removed.  Tests reach the helpers through
fixtures (`live`, `spawn_mem_child`, ...) or import them from testkit, never from this
module (`conftest` is not a reliable import name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from lksmfs.system import cgroups
from lksmfs.system.proc import PAGE_SIZE
from lksmfs.system.waiting import wait_until
from testkit.engine import open_fd_count
from testkit.memproc import MemProcess, filled
from testkit.mount import Mounts, skip_unless_fuse
from testkit.patterns import Region, byte_runs

V1_FREEZER = cgroups.V1_FREEZER
V2_ROOT = (cgroups.discover()[1] or ["/sys/fs/cgroup/unified"])[0]  # this machine's cgroup2


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("live test needs root (reads other processes' /proc/PID/mem)")


SpawnFn = Callable[..., MemProcess]


@pytest.fixture
def spawn_mem_child() -> Iterator[SpawnFn]:
    """Factory: spawn_mem_child(private=[..], zero=1, untouched=1, shared=[..], comm=..):
    region "private" (MAP_PRIVATE|ANON) holds one page per byte value of `private`, then
    `zero` pages that are only read (they map the shared zero page), then `untouched`
    pages (not present); region "shared" (MAP_SHARED|ANON, never scanned) one page per
    byte value of `shared`."""
    require_root()
    children: list[MemProcess] = []

    def spawn(
        private: list[int] | None = None,
        *,
        zero: int = 0,
        untouched: int = 0,
        shared: list[int] | None = None,
        comm: str = "lksmfs-child",
    ) -> MemProcess:
        pages = [*byte_runs(private or []), (zero, "read"), (untouched, "untouched")]
        child = MemProcess(Region("private", [p for p in pages if p[0]] or [(1, "untouched")]),
                           Region("shared", byte_runs(shared or []) or [(1, "untouched")],
                                  kind="shared"),
                           comm=comm, wait=False)
        children.append(child)
        child.wait_ready()
        return child

    try:
        yield spawn
    finally:
        for c in children:
            c.close()


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


@dataclass(frozen=True)
class LiveHelpers:
    """Plain helpers handed to tests by the `live` fixture."""

    page: int = PAGE_SIZE
    v1_freezer: str = V1_FREEZER
    v2_root: str = V2_ROOT

    @staticmethod
    def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> object:
        """The condition's truthy value; TimeoutError saying what was awaited."""
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
def child() -> Iterator[MemProcess]:
    """A live process with 64 identical pages for the daemon to scan."""
    with filled(64) as c:
        yield c
