"""Driving an engine on a virtual clock the way the daemon's two threads would."""

from __future__ import annotations

from memfake import FakeSource

from lksmfs.engine.ksm import Ksm
from lksmfs.simulate import VirtualClock
from lksmfs.sysfs.attrs import AttributeTable

STEP_BOUND = 2_000  # crawler passes + scanner batches an accepted request may take


def settle(ksm: Ksm, clock: VirtualClock, bound: int = STEP_BOUND) -> int:
    """Crawler and scanner, jumping the clock to each wake-up, until both sleep; returns
    the step count.  Fails if that takes more than `bound` steps (a wedge)."""
    for step in range(bound):
        if ksm.scanner_should_run():
            ksm.scan_batch()
            continue
        due = ksm.crawl(clock.now)
        if ksm.scanner_should_run():
            continue
        if due is None:
            return step
        clock.now = max(clock.now, due)
    raise AssertionError(f"engine still busy after {bound} steps: one_shot_scanning="
                         f"{ksm.tunables.one_shot_scanning} scan_state={ksm.scan_state}")


def booted(src: FakeSource) -> tuple[Ksm, AttributeTable, VirtualClock]:
    """An engine after `echo 8 > run` and its three initial full scans."""
    clock = VirtualClock()
    ksm = Ksm(src, clock=clock)
    table = AttributeTable(ksm)
    table.store("run", b"8\n")
    settle(ksm, clock)
    assert table.show("full_scans") == b"3\n"
    return ksm, table, clock
