"""The unit tests' way to drive an engine: lksmfs.workload.driver.Driver (the driver
`lksmfs simulate` and `lksmfs compare` use), a scanner batch of pages_to_scan at a
time, so that a test sees the engine between batches as the daemon's readers do."""

from __future__ import annotations

from memfake import FakeSource

from lksmfs.engine.ksm import Ksm
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import Driver, VirtualClock

STEP_BOUND = 2_000  # crawler passes + scanner batches an accepted request may take


def settle(ksm: Ksm, clock: VirtualClock, bound: int = STEP_BOUND) -> int:
    """Crawler and scanner until both sleep; the step count.  Fails (EngineBusy) if that
    takes more than `bound` steps (a wedge)."""
    return Driver(ksm, clock).settle(bound, batch=None)


def booted(src: FakeSource) -> tuple[Ksm, AttributeTable[Ksm], VirtualClock]:
    """An engine after `echo 8 > run` and its three initial full scans."""
    d = Driver.create(src)
    d.start()
    assert d.table.show("full_scans") == b"3\n"
    return d.ksm, d.table, d.clock
