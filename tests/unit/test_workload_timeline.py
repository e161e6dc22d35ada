"""The timeline player shared by the simulated source and the real spawner: which hook
runs for what, in which order, with which page changes (small.yaml's timeline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lksmfs.system.proc import TaskId
from lksmfs.workload.schema import WorkloadError, load_workload
from lksmfs.workload.timeline import Change, NewRound, Rewrite, TimelinePlayer

SMALL = Path(__file__).resolve().parents[2] / "config" / "workloads" / "small.yaml"


@dataclass
class Inst:
    name: str
    app: str
    task: TaskId
    frozen: bool = False
    alive: bool = True
    pending: list[Rewrite] = field(default_factory=list)


class Recorder(TimelinePlayer[Inst]):
    """A player whose hooks only write down what they were asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        super().__init__(load_workload(str(SMALL)))
        self._spawn_initial()

    def _start(self, names: Sequence[tuple[str, int]]) -> list[Inst]:
        out = []
        for app, index in names:
            inst = Inst(f"{app}/{index}", app, TaskId(100 + len(self._instances), self.round))
            self._instances[inst.name] = inst
            self.calls.append(("start", inst.name))
            out.append(inst)
        return out

    def _freeze(self, inst: Inst) -> None:
        self.calls.append(("freeze", inst.name))

    def _thaw(self, inst: Inst) -> None:
        self.calls.append(("thaw", inst.name))

    def _exit(self, inst: Inst) -> None:
        self.calls.append(("exit", inst.name))

    def _update(self, updates: Sequence[tuple[Inst, Sequence[Change]]]) -> None:
        for inst, changes in updates:
            self.calls.append(("update", inst.name, *map(repr, changes)))

    def instance_task(self, name: str) -> TaskId:
        return self._instances[name].task

    def take(self) -> list[tuple[str, ...]]:
        out, self.calls = self.calls, []
        return out


def test_rounds_events_and_catch_up() -> None:
    p = Recorder()
    assert p.take() == [("start", n) for n in ("viewer/0", "viewer/1", "player/0", "widget/0")]
    eff = p.advance_round(1)  # running instances get round 1, then the viewers freeze
    assert p.take() == [
        *(("update", n, repr(NewRound(1))) for n in ("viewer/0", "viewer/1", "player/0", "widget/0")),
        ("freeze", "viewer/0"), ("freeze", "viewer/1"),
    ]
    assert [e.action for e in eff.events] == ["freeze"]
    assert eff.hints == [(p.instance_task("viewer/0"), True), (p.instance_task("viewer/1"), True)]
    assert p.advance_round(2).one_shot == [1]
    p.take()
    p.advance_round(3)  # rewrite 1 of player (running) now; none is held for frozen viewers
    assert p.take() == [("update", "player/0", repr(NewRound(3))),
                        ("update", "widget/0", repr(NewRound(3))),
                        ("update", "player/0", repr(Rewrite(0.5, 1)))]
    p.rewrite("viewer", 1.0)  # rewrite 2: held back while frozen
    assert p.take() == [] and [i.pending for i in p.live("viewer")] == [[Rewrite(1.0, 2)]] * 2
    eff = p.advance_round(4)  # viewer/1 thaws: held rewrite first, then the current round
    assert p.take()[-2:] == [("thaw", "viewer/1"),
                             ("update", "viewer/1", repr(Rewrite(1.0, 2)), repr(NewRound(4)))]
    assert eff.hints == [(p.instance_task("viewer/1"), False)]
    eff = p.advance_round(6)
    calls = p.take()
    assert ("start", "viewer/2") in calls and ("exit", "player/0") in calls
    assert eff.exited == [p.instance_task("player/0")] and eff.one_shot == [2]
    assert [i.name for i in p.live()] == ["viewer/0", "viewer/1", "widget/0", "viewer/2"]
    with pytest.raises(ValueError, match="in the past"):
        p.advance_round(5)
    with pytest.raises(WorkloadError, match="nobody: no such app"):
        p.freeze("nobody")
    with pytest.raises(WorkloadError, match="viewer/9: no such instance"):
        p.thaw("viewer/9")
