"""FreezerWatcher rules on fake cgroup trees and a fake /proc (no root, no real cgroups)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from lksmfs.daemon.freezer import FreezerWatcher
from lksmfs.sources.base import TaskId
from lksmfs.sources.scope import Scope
from lksmfs.system.proc import PF_KTHREAD


class Tree:
    """Fake /proc plus fake v1 (freezer.state) and v2 (cgroup.events) hierarchies."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.v1 = root / "v1"
        self.v2 = root / "v2"
        for d in (self.proc, self.v1, self.v2):
            d.mkdir()

    def task(self, pid: int, comm: str = "app", start: int = 100, state: str = "S", flags: int = 0) -> TaskId:
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(f"{pid} ({comm}) {state} 1 1 1 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
        return TaskId(pid, start)

    def kill(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))

    def v1_group(self, name: str, state: str, pids: list[int]) -> Path:
        g = self.v1 / name
        g.mkdir(parents=True, exist_ok=True)
        (g / "freezer.state").write_text(state + "\n")
        (g / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        return g

    def v2_group(self, name: str, frozen: int, pids: list[int]) -> Path:
        g = self.v2 / name
        g.mkdir(parents=True, exist_ok=True)
        (g / "cgroup.events").write_text(f"populated {int(bool(pids))}\nfrozen {frozen}\n")
        (g / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        return g


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


class Rec:
    def __init__(self) -> None:
        self.hints: list[tuple[TaskId, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, t: TaskId, frozen: bool) -> None:
        with self.lock:
            self.hints.append((t, frozen))

    def take(self) -> list[tuple[TaskId, bool]]:
        with self.lock:
            out, self.hints = self.hints, []
        return out


def _watcher(tree: Tree, rec: Rec, **kw: object) -> FreezerWatcher:
    kw.setdefault("self_pid", 1)
    return FreezerWatcher(
        rec,
        v1_roots=[str(tree.v1)],
        v2_roots=[str(tree.v2)],
        proc_root=str(tree.proc),
        use_inotify=False,
        **kw,  # type: ignore[arg-type]
    )


def test_v1_transitions(tree: Tree) -> None:
    a, b = tree.task(10, start=1), tree.task(11, start=2)
    g = tree.v1_group("app", "THAWED", [10, 11])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert rec.take() == [] and w.groups() == {str(g): False}
    (g / "freezer.state").write_text("FREEZING\n")  # not frozen yet
    w.poll_once()
    assert rec.take() == []
    (g / "freezer.state").write_text("FROZEN\n")
    w.poll_once()
    assert rec.take() == [(a, True), (b, True)]
    w.poll_once()  # no transition, no hint
    assert rec.take() == []
    assert w.frozen_tasks() == {a, b}
    (g / "freezer.state").write_text("THAWED\n")
    w.poll_once()
    assert sorted(rec.take()) == [(a, False), (b, False)]
    assert w.frozen_tasks() == set()


def test_v2_transitions_and_nested_groups(tree: Tree) -> None:
    a, b = tree.task(10), tree.task(20)
    outer = tree.v2_group("app", 0, [10])
    inner = tree.v2_group("app/child", 0, [20])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert set(w.groups()) == {str(outer), str(inner)}
    # freezing a parent freezes the child: the kernel reports frozen 1 in both
    tree.v2_group("app", 1, [10])
    tree.v2_group("app/child", 1, [20])
    w.poll_once()
    assert sorted(rec.take()) == [(a, True), (b, True)]
    tree.v2_group("app/child", 0, [20])
    w.poll_once()
    assert rec.take() == [(b, False)]


def test_frozen_for_two_reasons_thaws_once(tree: Tree) -> None:
    t = tree.task(10)
    g1 = tree.v1_group("app", "FROZEN", [10])
    g2 = tree.v2_group("app", 1, [10])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert rec.take() == [(t, True)]  # once, not once per hierarchy
    (g1 / "freezer.state").write_text("THAWED\n")
    w.poll_once()
    assert rec.take() == []  # still frozen by v2
    tree.v2_group("app", 0, [10])
    w.poll_once()
    assert rec.take() == [(t, False)]
    assert g2.exists()


def test_initially_frozen_groups_optional(tree: Tree) -> None:
    t = tree.task(10)
    g = tree.v1_group("app", "FROZEN", [10])
    rec = Rec()
    w = _watcher(tree, rec, report_initial=False)
    w.poll_once()
    assert rec.take() == [] and w.groups() == {str(g): True}
    (g / "freezer.state").write_text("THAWED\n")
    w.poll_once()
    assert rec.take() == []  # never hinted frozen, so no thaw either
    (g / "freezer.state").write_text("FROZEN\n")
    w.poll_once()
    assert rec.take() == [(t, True)]


def test_members_joining_and_leaving_a_frozen_group(tree: Tree) -> None:
    a, b = tree.task(10), tree.task(11)
    tree.v1_group("app", "FROZEN", [10])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert rec.take() == [(a, True)]
    tree.v1_group("app", "FROZEN", [11])  # 10 moved out (thawed), 11 moved in (frozen)
    w.poll_once()  # not a walk yet: membership is only re-read on walks
    assert rec.take() == []
    w.poll_once(force_walk=True)
    assert rec.take() == [(b, True), (a, False)]


def test_removed_group_and_dead_tasks(tree: Tree) -> None:
    a, b = tree.task(10), tree.task(11)
    g = tree.v1_group("app", "FROZEN", [10, 11])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert rec.take() == [(a, True), (b, True)]
    tree.kill(11)  # a dead task needs no thaw hint
    shutil.rmtree(g)  # the group is removed: the next walk drops it
    w.poll_once(force_walk=True)
    assert rec.take() == [(a, False)]
    assert w.groups() == {}
    w.poll_once(force_walk=True)
    assert rec.take() == [] and w.errors == 0


def test_reused_pid_is_not_thawed(tree: Tree) -> None:
    a = tree.task(10, start=1)
    g = tree.v1_group("app", "FROZEN", [10])
    rec = Rec()
    w = _watcher(tree, rec)
    w.poll_once()
    assert rec.take() == [(a, True)]
    tree.task(10, start=2)  # 10 died and the pid went to a new, unfrozen process
    tree.v1_group("app", "THAWED", [])
    w.poll_once()
    assert rec.take() == []
    assert g.exists()


def test_self_kthreads_and_scope_are_filtered(tree: Tree) -> None:
    tree.task(1, "lksmfsd")
    tree.task(2, "kworker", flags=PF_KTHREAD)
    keep = tree.task(10, "app")
    tree.task(11, "noisy")
    tree.v1_group("app", "FROZEN", [1, 2, 10, 11, 404])
    rec = Rec()
    w = _watcher(tree, rec, self_pid=1, scope=Scope(exclude_comms={"noisy"}))
    w.poll_once()
    assert rec.take() == [(keep, True)]


def test_sigstop_as_frozen(tree: Tree) -> None:
    t = tree.task(10, state="T")
    tree.task(11, state="S")
    rec = Rec()
    w = _watcher(tree, rec, treat_sigstop_as_frozen=True, sigstop_interval=0.0)
    w.poll_once()
    assert rec.take() == [(t, True)]
    tree.task(10, state="S")
    w.poll_once()
    assert rec.take() == [(t, False)]
    rec2 = Rec()
    w2 = _watcher(tree, rec2)  # off by default
    tree.task(10, state="T")
    w2.poll_once()
    assert rec2.take() == []


def test_on_hint_exception_does_not_stop_the_watcher(tree: Tree) -> None:
    a, b = tree.task(10), tree.task(11)
    tree.v1_group("app", "FROZEN", [10, 11])
    seen: list[TaskId] = []

    def bad(t: TaskId, frozen: bool) -> None:
        seen.append(t)
        raise RuntimeError("engine bug")

    w = FreezerWatcher(bad, v1_roots=[str(tree.v1)], v2_roots=[], proc_root=str(tree.proc))
    w.poll_once()
    assert seen == [a, b] and w.errors == 2


def _wait(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return bool(pred())  # type: ignore[operator]


def test_thread_sees_v2_change_by_inotify(tree: Tree) -> None:
    t = tree.task(10)
    g = tree.v2_group("app", 0, [10])
    rec = Rec()
    # a walk only every minute: a change can only be noticed through inotify
    w = FreezerWatcher(
        rec,
        v1_roots=[],
        v2_roots=[str(tree.v2)],
        proc_root=str(tree.proc),
        rewalk_interval=60.0,
    )
    w.start()
    try:
        assert _wait(lambda: str(g) in w.groups())
        with open(g / "cgroup.events", "w") as f:
            f.write("populated 1\nfrozen 1\n")
        assert _wait(lambda: rec.hints == [(t, True)])
    finally:
        w.stop()
    assert not w.running


def test_thread_polls_v1(tree: Tree) -> None:
    t = tree.task(10)
    g = tree.v1_group("app", "THAWED", [10])
    rec = Rec()
    w = _watcher(tree, rec, rewalk_interval=60.0, poll_interval=0.01)
    w.start()
    w.start()  # idempotent
    try:
        assert _wait(lambda: str(g) in w.groups())
        (g / "freezer.state").write_text("FROZEN\n")
        assert _wait(lambda: rec.hints == [(t, True)])
    finally:
        w.stop()
        w.stop()
    assert not w.running
