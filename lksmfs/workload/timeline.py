"""Playing a workload's timeline: one player for the simulated source and the real spawner.

Both realisations of a workload move through the same rounds and events; only what an
event does to one instance differs (flip a flag and re-key a model, or write a cgroup
file and tell a child process).  `TimelinePlayer` owns everything they share: the round
number, which timeline events are due, which instances a target names, rewrite numbers,
rewrites held back while an instance is frozen, and the Effects the daemon (or a test)
passes on to the engine.  Subclasses implement five hooks: _start, _freeze, _thaw,
_exit and _update.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lksmfs.system.proc import TaskId
from lksmfs.workload.schema import Event, Workload, WorkloadError


@dataclass(frozen=True)
class Rewrite:
    """Rewrite number `number` of `fraction` of every section (InstanceModel.rewrite)."""

    fraction: float
    number: int


@dataclass(frozen=True)
class NewRound:
    """The volatile pages take round `round`'s content (InstanceModel.set_round)."""

    round: int


Change = Rewrite | NewRound


@dataclass
class Effects:
    """What applying events produced, for the daemon to pass on to the engine."""

    events: list[Event] = field(default_factory=list)  # applied, in order
    hints: list[tuple[TaskId, bool]] = field(default_factory=list)  # ksm.hint(task, frozen)
    one_shot: list[int] = field(default_factory=list)  # ksm.request_one_shot(mode)
    spawned: list[TaskId] = field(default_factory=list)
    exited: list[TaskId] = field(default_factory=list)  # the engine sees ProcessGone

    def extend(self, other: Effects) -> None:
        self.events += other.events
        self.hints += other.hints
        self.one_shot += other.one_shot
        self.spawned += other.spawned
        self.exited += other.exited


class Instance(Protocol):
    """What the player needs of one instance (APP/K) of either realisation."""

    name: str
    app: str
    alive: bool
    frozen: bool
    pending: list[Rewrite]  # rewrites that wait for a thaw

    @property
    def task(self) -> TaskId: ...


InstT = TypeVar("InstT", bound=Instance)


class TimelinePlayer(Generic[InstT]):
    """Rounds and events of a workload over instances of type InstT.  Thread-safe."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.round = 0
        self._applied = 0  # timeline events applied so far
        self._rewrites = 0  # rewrite numbers handed out
        self._lock = threading.RLock()
        self._instances: dict[str, InstT] = {}  # APP/K -> instance, in spawn order
        self._next_index = {a.name: 0 for a in workload.apps}

    # -- hooks ------------------------------------------------------------------------

    def _start(self, names: Sequence[tuple[str, int]]) -> list[InstT]:
        """New instances (app, index) at the current round, in that order, each added to
        self._instances as soon as it exists (so that a failure half-way leaves nothing
        that cleanup cannot find)."""
        raise NotImplementedError

    def _freeze(self, inst: InstT) -> None:
        """Freeze one running instance (nothing to do for a simulated one)."""

    def _thaw(self, inst: InstT) -> None:
        """Thaw one frozen instance; its catch-up comes next through _update."""

    def _exit(self, inst: InstT) -> None:
        """The instance exits (nothing to do for a simulated one)."""

    def _update(self, updates: Sequence[tuple[InstT, Sequence[Change]]]) -> None:
        """Rewrite the pages of running instances, each change in order."""
        raise NotImplementedError

    # -- inspection -------------------------------------------------------------------

    def live(self, app: str | None = None) -> list[InstT]:
        """Live instances (of `app`), in spawn order."""
        with self._lock:
            return [i for i in self._instances.values()
                    if i.alive and (app is None or i.app == app)]

    def targets(self, target: str) -> list[InstT]:
        """The live instances an event's target names: APP/K, or every instance of APP."""
        if "/" in target:
            inst = self._instances.get(target)
            if inst is None:
                raise WorkloadError(f"{self.workload.path}: {target}: no such instance")
            return [inst] if inst.alive else []
        if target not in self._next_index:
            raise WorkloadError(f"{self.workload.path}: {target}: no such app")
        return self.live(target)

    # -- the timeline -----------------------------------------------------------------

    def advance_round(self, n: int) -> Effects:
        """Go to round n: volatile pages of running instances are rewritten for round n,
        then the timeline events with round <= n not yet applied are applied."""
        if n < self.round:
            raise ValueError(f"round {n} is in the past (now {self.round})")
        eff = Effects()
        with self._lock:
            if n > self.round:
                self.round = n
                self._update([(i, [NewRound(n)]) for i in self.live() if not i.frozen])
            tl = self.workload.timeline
            while self._applied < len(tl) and tl[self._applied].round <= n:
                eff.extend(self.apply(tl[self._applied]))
                self._applied += 1
        return eff

    def apply(self, event: Event) -> Effects:
        """Apply one event now (whatever its round)."""
        eff = Effects(events=[event])
        with self._lock:
            if event.action == "one_shot":
                eff.one_shot.append(event.mode)
            elif event.action == "spawn":
                eff.spawned += [i.task for i in self._spawn([event.target] * event.count)]
            elif event.action == "freeze":
                for inst in self.targets(event.target):
                    if not inst.frozen:
                        self._freeze(inst)
                        inst.frozen = True
                        eff.hints.append((inst.task, True))
            elif event.action == "thaw":
                thawed = [i for i in self.targets(event.target) if i.frozen]
                for inst in thawed:
                    self._thaw(inst)
                    inst.frozen = False
                    eff.hints.append((inst.task, False))
                # what it could not do while frozen: held rewrites, this round's content
                self._update([(i, [*self._take_pending(i), NewRound(self.round)]) for i in thawed])
            elif event.action == "exit":
                for inst in self.targets(event.target):
                    self._exit(inst)
                    inst.alive = False
                    inst.frozen = False
                    eff.exited.append(inst.task)
            elif event.action == "rewrite":
                self._rewrites += 1
                targets = self.targets(event.target)
                for inst in targets:
                    inst.pending.append(Rewrite(event.fraction, self._rewrites))
                self._update([(i, self._take_pending(i)) for i in targets if not i.frozen])
            else:
                raise WorkloadError(f"{self.workload.path}: unknown action {event.action!r}")
        return eff

    def freeze(self, target: str) -> Effects:
        return self.apply(Event(self.round, "freeze", target))

    def thaw(self, target: str) -> Effects:
        return self.apply(Event(self.round, "thaw", target))

    def exit(self, target: str) -> Effects:
        return self.apply(Event(self.round, "exit", target))

    def spawn(self, app: str, count: int = 1) -> Effects:
        return self.apply(Event(self.round, "spawn", app, count=count))

    def rewrite(self, target: str, fraction: float) -> Effects:
        return self.apply(Event(self.round, "rewrite", target, fraction=fraction))

    # -- internals ----------------------------------------------------------------------

    def _spawn_initial(self) -> list[InstT]:
        """Every app's initial `count` instances, all started at once."""
        return self._spawn([a.name for a in self.workload.apps for _ in range(a.count)])

    def _spawn(self, apps: Sequence[str]) -> list[InstT]:
        names = []
        for app in apps:
            if app not in self._next_index:
                raise WorkloadError(f"{self.workload.path}: {app}: no such app")
            names.append((app, self._next_index[app]))
            self._next_index[app] += 1
        return self._start(names)

    @staticmethod
    def _take_pending(inst: InstT) -> list[Change]:
        changes: list[Change] = list(inst.pending)
        inst.pending.clear()
        return changes
