"""FreezerWatcher against the real cgroup v1 freezer and cgroup v2 cgroup.freeze (root)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lksmfs.daemon.freezer import FreezerWatcher
from lksmfs.sources.base import TaskId
from lksmfs.sources.scope import Scope
from lksmfs.system.cgroups import discover
from lksmfs.system.proc import task_id

pytestmark = pytest.mark.live

CgroupFactory = Callable[[], str]  # fixtures v1_freezer_cgroup / v2_cgroup
Sleeper = Callable[[], subprocess.Popen[bytes]]
DEADLINE = 5.0  # generous: the watcher promises 200 ms


class Recorder:
    """Collects hints from the watcher thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hints: list[tuple[TaskId, bool]] = []

    def __call__(self, task: TaskId, frozen: bool) -> None:
        with self.lock:
            self.hints.append((task, frozen))

    def for_task(self, t: TaskId) -> list[bool]:
        with self.lock:
            return [f for task, f in self.hints if task == t]


def _tid(pid: int) -> TaskId:
    return task_id(pid)


@pytest.fixture
def watch(live: Any) -> Iterator[Callable[..., tuple[FreezerWatcher, Recorder]]]:
    """Factory of started watchers; all stopped at the end."""
    made: list[FreezerWatcher] = []

    def make(**kw: Any) -> tuple[FreezerWatcher, Recorder]:
        rec = Recorder()
        w = FreezerWatcher(rec, **kw)
        made.append(w)
        w.start()
        return w, rec

    try:
        yield make
    finally:
        for w in made:
            w.stop()


def test_discovers_the_machines_hierarchies(live: Any) -> None:
    v1, v2 = discover()
    if not os.path.exists(os.path.join(live.v1_freezer, "freezer.state")) and not v1:
        pytest.skip("no v1 freezer mounted")
    assert live.v1_freezer in v1
    assert live.v2_root in v2


def test_v1_freeze_and_thaw_hint_every_task(
    live: Any, watch: Any, sleeper: Sleeper, v1_freezer_cgroup: CgroupFactory
) -> None:
    g = v1_freezer_cgroup()
    a, b = sleeper(), sleeper()
    for p in (a, b):
        live.move_to_cgroup(g, p.pid)
    ta, tb = _tid(a.pid), _tid(b.pid)
    w, rec = watch(v1_roots=[live.v1_freezer], v2_roots=[])
    live.wait_until(lambda: g in w.groups(), DEADLINE)
    live.write(f"{g}/freezer.state", "FROZEN")
    live.wait_until(lambda: rec.for_task(ta) == [True] and rec.for_task(tb) == [True])
    assert w.frozen_tasks() >= {ta, tb}
    live.write(f"{g}/freezer.state", "THAWED")
    live.wait_until(
        lambda: rec.for_task(ta) == [True, False] and rec.for_task(tb) == [True, False]
    )
    assert not w.frozen_tasks() & {ta, tb}
    assert w.errors == 0


def test_v2_freeze_and_thaw(
    live: Any, watch: Any, sleeper: Sleeper, v2_cgroup: CgroupFactory
) -> None:
    g = v2_cgroup()
    p = sleeper()
    live.move_to_cgroup(g, p.pid)
    t = _tid(p.pid)
    w, rec = watch(v1_roots=[], v2_roots=[live.v2_root])
    live.wait_until(lambda: g in w.groups(), DEADLINE)
    live.write(f"{g}/cgroup.freeze", "1")
    live.wait_until(lambda: rec.for_task(t) == [True], DEADLINE)
    live.write(f"{g}/cgroup.freeze", "0")
    live.wait_until(lambda: rec.for_task(t) == [True, False], DEADLINE)
    assert w.errors == 0


def test_group_created_after_start_is_found(
    live: Any, watch: Any, sleeper: Sleeper, v2_cgroup: CgroupFactory
) -> None:
    w, rec = watch(v1_roots=[], v2_roots=[live.v2_root], rewalk_interval=0.2)
    g = v2_cgroup()
    p = sleeper()
    live.move_to_cgroup(g, p.pid)
    live.write(f"{g}/cgroup.freeze", "1")
    t = _tid(p.pid)
    live.wait_until(lambda: rec.for_task(t) == [True], DEADLINE)


def test_task_moved_into_frozen_v1_group_is_hinted(
    live: Any, watch: Any, sleeper: Sleeper, v1_freezer_cgroup: CgroupFactory
) -> None:
    g = v1_freezer_cgroup()
    a = sleeper()
    live.move_to_cgroup(g, a.pid)
    w, rec = watch(v1_roots=[live.v1_freezer], v2_roots=[], rewalk_interval=0.2)
    live.write(f"{g}/freezer.state", "FROZEN")
    live.wait_until(lambda: rec.for_task(_tid(a.pid)) == [True], DEADLINE)
    b = sleeper()
    tb = _tid(b.pid)
    live.move_to_cgroup(g, b.pid)  # the kernel freezes it on arrival
    live.wait_until(lambda: rec.for_task(tb) == [True], DEADLINE)


def test_sigstop_counts_as_frozen_when_asked(live: Any, watch: Any, sleeper: Sleeper) -> None:
    p = sleeper()
    t = _tid(p.pid)
    w, rec = watch(
        v1_roots=[], v2_roots=[], treat_sigstop_as_frozen=True, scope=Scope(pids={p.pid})
    )
    os.kill(p.pid, signal.SIGSTOP)
    live.wait_until(lambda: rec.for_task(t) == [True], DEADLINE)
    os.kill(p.pid, signal.SIGCONT)
    live.wait_until(lambda: rec.for_task(t) == [True, False], DEADLINE)


def test_groups_vanishing_mid_walk_do_not_hurt(
    live: Any, watch: Any, v1_freezer_cgroup: CgroupFactory, v2_cgroup: CgroupFactory
) -> None:
    w, rec = watch(v1_roots=[live.v1_freezer], v2_roots=[live.v2_root], rewalk_interval=0.01)
    for _ in range(30):
        for g in (v1_freezer_cgroup(), v2_cgroup()):
            os.rmdir(g)
    # the watcher lost every one of them again and never failed
    live.wait_until(lambda: not any("lksmfs-test-" in p for p in w.groups()), DEADLINE)
    assert w.running and w.errors == 0


def test_stop_joins_and_releases_fds(
    live: Any, v1_freezer_cgroup: CgroupFactory, v2_cgroup: CgroupFactory
) -> None:
    for _ in range(3):
        v1_freezer_cgroup()
        v2_cgroup()
    base = live.open_fd_count()
    w = FreezerWatcher(lambda t, f: None, v1_roots=[live.v1_freezer], v2_roots=[live.v2_root])
    w.start()
    live.wait_until(lambda: len(w.groups()) >= 6, DEADLINE)
    assert live.open_fd_count() > base
    w.stop()
    assert not w.running
    assert live.open_fd_count() == base
