"""The one engine driver (lksmfs.workload.driver): a process exit means the same
wherever the engine is driven - `lksmfs simulate`, `lksmfs compare` and the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lksmfs.commands.compare import POLICIES, Player, opted_in
from lksmfs.commands.simulate import simulate
from lksmfs.engine.params import LKSM_SCAN_FULL, POLICY_KSM, POLICY_LKSM
from lksmfs.sources.base import TaskId
from lksmfs.workload.driver import Driver, EngineBusy, VirtualClock
from lksmfs.workload.schema import load_workload
from lksmfs.workload.simulated import SimulatedSource

SMALL = str(Path(__file__).resolve().parents[2] / "config" / "workloads" / "small.yaml")
EXIT_ROUND = 6  # small.yaml: {round: 6, exit: player/0}


def _driver(policy: str) -> tuple[Driver, SimulatedSource]:
    workload = load_workload(SMALL)
    src = SimulatedSource(opted_in(workload) if policy == POLICY_KSM else workload)
    return Driver.create(src, policy=policy), src


@pytest.mark.parametrize("policy", [POLICY_LKSM, POLICY_KSM])
def test_an_exit_leaves_at_once_under_both_policies(policy: str) -> None:
    """exit_mm() -> ksm_exit(): the player's mm is no longer registered the moment the
    round that ends it is applied, before any scan; the others stay.  small.yaml: two
    viewers, one player and a widget at start (the widget is a short task under LKSM: 50
    ms of CPU), a third viewer spawned in round 5 (a newcomer until a scan takes it)."""
    d, src = _driver(policy)
    d.start()
    for r in range(1, EXIT_ROUND):
        d.advance_round(r)
        if policy == POLICY_KSM:
            d.full_scan()
        else:
            d.one_shot(LKSM_SCAN_FULL)
    player = src.task_of("player/0")
    registered = set(d.ksm.slots)
    assert player in registered
    # by hand: viewers 0-2 and the player; the widget too under mainline (opted in, no
    # short-task rule), never under LKSM
    assert len(registered) == (5 if policy == POLICY_KSM else 4)
    eff = d.advance_round(EXIT_ROUND)
    assert eff.exited == [player]
    assert set(d.ksm.slots) == registered - {player}
    assert d.ksm.counters()["scanning_process"] == len(registered) - 1


def test_simulate_compare_and_the_tests_pass_exits_through_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the three reaches the engine's exit hook through Driver.exit, with the
    task the timeline ends, under both policies."""
    seen: list[tuple[str, int]] = []
    real_exit = Driver.exit

    def exit_(self: Driver, task: TaskId) -> None:
        seen.append((self.ksm.policy, task.pid))
        real_exit(self, task)

    monkeypatch.setattr(Driver, "exit", exit_)
    player_pid = SimulatedSource(load_workload(SMALL)).task_of("player/0").pid
    for policy in (POLICY_LKSM, POLICY_KSM):
        seen.clear()
        simulate(SMALL, rounds=EXIT_ROUND, policy=policy)
        assert seen == [(policy, player_pid)], ("simulate", policy)
        seen.clear()
        # rounds of 3 simulated seconds for 30 seconds: round 6 is played
        name = "lksm" if policy == POLICY_LKSM else "ksm"
        Player(load_workload(SMALL), POLICIES[name], hours=30 / 3600, round_minutes=0.05).run()
        assert seen == [(policy, player_pid)], ("compare", policy)
        seen.clear()
        d, _src = _driver(policy)
        d.start()
        for r in range(1, EXIT_ROUND + 1):
            d.advance_round(r)
        assert seen == [(policy, player_pid)], ("driver", policy)


def test_settle_jumps_the_clock_to_each_wake_up_and_stops_idle() -> None:
    """run=8: the crawler's three initial full scans, then it sleeps until woken (no
    periodic scan in one-shot mode): settle returns with the clock where the crawler
    last asked to be woken, and three scans recorded."""
    d, _src = _driver(POLICY_LKSM)
    d.recording = True
    d.start()
    assert [s["mode"] for s in d.scans] == ["full"] * 3
    assert d.ksm.counters()["full_scans"] == 3
    assert len(d.wall_s) == 3
    assert d.settle() == 0  # idle: nothing due


def test_a_wedged_engine_is_said() -> None:
    """run=1 (periodic) never idles: settle gives up after its bound, naming the state."""
    d, _src = _driver(POLICY_LKSM)
    d.table.store("run", b"1\n")
    with pytest.raises(EngineBusy, match="still busy after 50 steps"):
        d.settle(bound=50)


def test_virtual_clock_moves_only_when_told() -> None:
    clock = VirtualClock(2.5)
    assert clock() == 2.5
    clock.now = 7.0
    assert clock() == 7.0
