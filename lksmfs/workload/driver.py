"""One way to drive the engine on simulated time: `lksmfs simulate`, `lksmfs compare`
and the tests all go through `Driver`.

The daemon drives the engine with threads on the wall clock (lksmfs.daemon.service);
the driver does what those threads do, step by step on a virtual clock:

- the crawler (ksm_crawld) and the scanner (ksmd): `settle()` runs them until both sleep
  with nothing due, jumping the clock to each wake-up the crawler asks for;
- the kernel's hooks, one meaning each, as the daemon's watchers call them:
  a process exit (or an exec's new mm) is `Ksm.task_exit()` - exit_mm() -> ksm_exit() -
  under both policies; a freeze or thaw is `Ksm.hint()` (LKSM's freezer hook; mainline
  has none); a one_shot request is the store to one_shot_scanning;
- a workload's round (`advance_round`): the source applies the round's spawns, writes
  and events, and the driver passes on what they mean to the engine;
- figures: every scan that ends is recorded (`scans`), in the columns `lksmfs simulate`
  prints; `on_scan` sees each one.

Here a scan takes no time (`VirtualClock`): `simulate` and the tests.  `compare` paces
the scanner as the kernel does, a batch of pages_to_scan every sleep_millisecs
(lksmfs.workload.paced.PacedDriver, this driver with the threads' timing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lksmfs.engine.advisor import MODELLED_SCAN_NS_PER_PAGE
from lksmfs.engine.params import (
    INITIAL_ROUND,
    KSM_RUN_MERGE,
    KSM_RUN_ONESHOT,
    POLICY_KSM,
    POLICY_LKSM,
    mode_name,
)
from lksmfs.sysfs.attrs import AttributeTable, apply_settings
from lksmfs.workload.timeline import Effects

if TYPE_CHECKING:  # numpy and the engine load when a driver is made, not at import
    from lksmfs.engine.ksm import Ksm
    from lksmfs.sources.base import MemorySource, TaskId

STEP_BOUND = 100_000  # crawler passes + scanner batches before `settle` calls it a wedge
ALL_PAGES = 1 << 30  # a scanner batch that runs the scan to its end


class EngineBusy(RuntimeError):
    """`settle` gave up: the engine kept asking for work (a wedge)."""


class VirtualClock:
    """Simulated time in seconds: it moves only when the driver (or a test) moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_engine(source: MemorySource, clock: VirtualClock, *, policy: str = POLICY_LKSM, filter_enabled: bool = True,
               settings: Mapping[str, int | str] | None = None, modelled_cpu: bool = False,
               **kwargs: Any) -> tuple[Ksm, AttributeTable[Ksm]]:
    """An engine over `source` on `clock`, and its attribute table with `settings`
    stored.  `modelled_cpu`: the advisor sees the time a kernel would take per page
    (MODELLED_SCAN_NS_PER_PAGE), not this process's CPU time, so that its figures are the
    same on every run."""
    from lksmfs.engine.ksm import Ksm

    made: list[Ksm] = []
    if modelled_cpu:
        kwargs["scan_cpu_ns"] = lambda: made[0].stats.pages_scanned * MODELLED_SCAN_NS_PER_PAGE
    ksm = Ksm(source, filter_enabled=filter_enabled, clock=clock, policy=policy, **kwargs)
    made.append(ksm)
    table = AttributeTable(ksm)
    apply_settings(table, settings or {})
    return ksm, table


@runtime_checkable
class RoundSource(Protocol):
    """A source whose memory follows a workload's timeline (SimulatedSource)."""

    def advance_round(self, r: int) -> Effects: ...


class Driver:
    """An engine, its attribute table and its virtual clock, driven as the daemon drives
    one (see the module's docstring)."""

    def __init__(self, ksm: Ksm, clock: VirtualClock, *, table: AttributeTable[Ksm] | None = None,
                 source: RoundSource | None = None, lock: AbstractContextManager[object] | None = None,
                 on_scan: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.ksm = ksm
        self.clock = clock
        self.table = table if table is not None else AttributeTable(ksm)
        self.source = source
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.on_scan = on_scan
        self.round = 0  # the workload's round the engine is in
        self.scans: list[dict[str, Any]] = []  # one record per scan that ended
        self.wall_s: list[float] = []  # ... and the wall time each took (not a figure: it varies)
        self.recording = False  # keep `scans` (simulate); tests and compare need none

    @classmethod
    def create(cls, source: MemorySource, *, clock: VirtualClock | None = None, policy: str = POLICY_LKSM,
               filter_enabled: bool = True, settings: Mapping[str, int | str] | None = None,
               modelled_cpu: bool = False, **kwargs: Any) -> Driver:
        """A driver of a new engine over `source` (see new_engine())."""
        clock = clock if clock is not None else VirtualClock()
        ksm, table = new_engine(source, clock, policy=policy, filter_enabled=filter_enabled, settings=settings,
                                modelled_cpu=modelled_cpu, **kwargs)
        return cls(ksm, clock, table=table, source=source if isinstance(source, RoundSource) else None)

    # -- the kernel's hooks ---------------------------------------------------------------

    def exit(self, task: TaskId) -> None:
        """exit_mm() -> ksm_exit(): the mm leaves now (both policies, as the daemon's
        lifecycle watcher calls it)."""
        with self.lock:
            self.ksm.task_exit(task)

    def hint(self, task: TaskId, frozen: bool) -> None:
        """The freezer's hook (lksm_hint): LKSM only, mainline has no freezer hook."""
        if self.ksm.policy != POLICY_LKSM:
            return
        with self.lock:
            self.ksm.hint(task, frozen)

    def request(self, mode: int) -> bool:
        """`echo MODE > one_shot_scanning`: False while another request is pending."""
        with self.lock:
            return self.ksm.request_one_shot(mode)

    def apply(self, eff: Effects) -> None:
        """What a round's events mean to the engine: exits, then freezes and thaws."""
        for task in eff.exited:
            self.exit(task)
        for task, frozen in eff.hints:
            self.hint(task, frozen)

    def advance_round(self, r: int) -> Effects:
        """Round `r` of the workload: the source applies its spawns, writes and events,
        the engine hears of exits, freezes and thaws.  The round's one_shot requests are
        the caller's to send (resourced decides when)."""
        if self.source is None:
            raise TypeError("this driver's source has no timeline")
        self.round = r
        eff = self.source.advance_round(r)
        self.apply(eff)
        return eff

    # -- the threads ----------------------------------------------------------------------

    def settle(self, bound: int = STEP_BOUND, batch: int | None = ALL_PAGES) -> int:
        """The crawler and the scanner, jumping the clock to each wake-up, until both
        sleep with nothing due; returns the steps taken.  A scanner step is a batch of
        `batch` pages (None: pages_to_scan, as ksmd's; the default runs a scan to its
        end).  Raises EngineBusy after `bound` steps (a wedge)."""
        ksm = self.ksm
        for step in range(bound):
            with self.lock:
                if ksm.scanner_should_run():
                    ksm.scan_batch(batch)
                    if not ksm.scan_state:
                        self._scanned()
                    continue
                due = ksm.crawl(self.clock.now)
                if ksm.scanner_should_run():
                    continue
            if due is None:
                return step
            self.clock.now = max(self.clock.now, due)
        raise EngineBusy(f"engine still busy after {bound} steps: one_shot_scanning="
                         f"{ksm.tunables.one_shot_scanning} scan_state={ksm.scan_state}")

    def start(self, run: int | None = None) -> None:
        """`echo RUN > run` and the initial full scans: under LKSM the crawler's
        INITIAL_ROUND (run=8 by default), under mainline INITIAL_ROUND passes (run=1)."""
        if self.ksm.policy == POLICY_KSM:
            self.table.store("run", f"{KSM_RUN_MERGE if run is None else run}\n".encode())
            for _ in range(INITIAL_ROUND):
                self.full_scan()
            return
        self.table.store("run", f"{KSM_RUN_ONESHOT if run is None else run}\n".encode())
        self.settle()

    def full_scan(self) -> None:
        """One whole scan, at once (ksmd's pass under mainline)."""
        with self.lock:
            self.ksm.full_scan()
        self._scanned()

    def one_shot(self, mode: int) -> None:
        """resourced's request, served: the store, then the threads until idle."""
        self.request(mode)  # refused while one is pending: that one is served instead
        self.settle()

    # -- figures --------------------------------------------------------------------------

    def _scanned(self) -> None:
        if not self.recording and self.on_scan is None:
            return
        rec = self.scan_record()
        if self.recording:
            self.scans.append(rec)
            self.wall_s.append(float(self.ksm.last_scan["wall_s"]))
        if self.on_scan is not None:
            self.on_scan(rec)

    def scan_record(self) -> dict[str, Any]:
        """The figures after the scan that just ended: every attribute, then what the scan
        did (the columns of `lksmfs simulate`)."""
        rec: dict[str, Any] = dict(self.table.values())
        s = self.ksm.last_scan
        rec.update(round=self.round, mode=mode_name(s["mode"]), slots_scanned=s["slots_scanned"],
                   scanned=s["pages_scanned"], merged=s["merged"], broken=s["broken"])
        return rec
