"""The driver with the threads' timing: the scanner runs a batch of pages_to_scan pages
every sleep_millisecs, the crawler sleeps and wakes as it asks, on a millisecond clock
(`lksmfs compare`: hours of a device's life, the same figures on every run).

A `PacedDriver` is a `Driver` (lksmfs.workload.driver): the same engine, the same hooks
(an exit, a freeze, a request mean what they mean everywhere), the same rounds.  What it
adds is when things happen: timeline round R at R x round_ms, a sample of pages_scanned
and pages_sharing every sample_ms, resourced's one_shot requests one after another, and
mainline's quiet passes fast-forwarded (lksmfs.engine.fastpass, exact).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from lksmfs.engine.params import KSM_RUN_MERGE, LKSM_SCAN_FULL, LKSM_SCAN_NONE, POLICY_LKSM
from lksmfs.workload.driver import Driver, EngineBusy, RoundSource, VirtualClock, new_engine

if TYPE_CHECKING:
    from lksmfs.engine.ksm import Ksm
    from lksmfs.sources.base import MemorySource

SAMPLE_MS = 60_000  # one sample per simulated minute
NEVER = 1 << 62


def _ms(seconds: float) -> int:
    """A crawler's wake-up time on the driver's millisecond clock (the crawler is then
    called with the very float it asked for: it compares them with `now`)."""
    return int(round(seconds * 1000))


class PacedClock(VirtualClock):
    """The clock of a paced scanner: while a scan runs, a batch of pages_to_scan pages
    happens every sleep_millisecs from the scan's first batch, so the time of whatever
    the scanner does is that of the batch it falls in (the engine may run many batches
    in one call).  Times are whole milliseconds, `now_ms`."""

    def __init__(self) -> None:
        super().__init__()
        self.now_ms = 0
        self.scan_ms: int | None = None  # the scan's first batch
        self.scan_base = 0  # pages_scanned when it began
        self.ksm: Ksm | None = None

    def set_ms(self, ms: int) -> None:
        self.now_ms = ms
        self.now = ms / 1000

    def batch_ms(self) -> int:
        k = self.ksm
        if self.scan_ms is None or k is None:
            return self.now_ms
        done = k.stats.pages_scanned - self.scan_base
        return self.scan_ms + done // k.tunables.pages_to_scan * k.tunables.sleep_millisecs

    def __call__(self) -> float:
        return self.batch_ms() / 1000


class PacedDriver(Driver):
    """The daemon's threads on a paced virtual clock, from time 0 to `end_ms`."""

    def __init__(self, source: MemorySource, *, policy: str, filter_enabled: bool, end_ms: int, round_ms: int,
                 resourced: bool = False, fast: bool = True, name: str = "",
                 progress: Callable[[str], None] | None = None, sample_ms: int = SAMPLE_MS) -> None:
        from lksmfs.engine.fastpass import FastScanner

        if end_ms <= 0 or round_ms <= 0:
            raise ValueError("--hours and --round-minutes must be positive")
        clock = PacedClock()
        ksm, table = new_engine(source, clock, policy=policy, filter_enabled=filter_enabled, modelled_cpu=True)
        clock.ksm = ksm
        super().__init__(ksm, clock, table=table, source=source if isinstance(source, RoundSource) else None)
        self.clock: PacedClock = clock
        self.name = name or policy
        self.end_ms = end_ms
        self.round_ms = round_ms
        self.sample_ms = sample_ms
        self.resourced = resourced  # one_shot requests from the timeline (LKSM in one-shot mode)
        self.scanner = FastScanner(ksm, fast=fast)
        self.progress = progress or (lambda line: None)
        self.c_due: int | None = 0  # the crawler's next wake-up
        self.c_due_s: float | None = None  # ... as the crawler asked for it (None: woken)
        self.s_due: int | None = None  # the scanner's next batch while a scan runs
        self.carry = 0  # pages the engine is ahead of the batches (a fast slot ran over a sample)
        self.requests: deque[int] = deque()  # resourced's one_shot requests, in order
        self.samples: list[dict[str, int | float]] = []
        self._same = 0  # crawler passes in a row at the same time (a wedge guard)
        self._last_crawl = -1

    def play(self) -> list[dict[str, int | float]]:
        """Every round, crawler pass, scanner batch and sample from 0 to end_ms, in time
        order; the samples."""
        t = self.ksm.tunables
        if t.sleep_millisecs <= 0 or t.pages_to_scan <= 0:
            raise ValueError("compare needs sleep_millisecs and pages_to_scan above 0")
        next_round, next_sample, reported = 1, 0, 0
        while True:
            ts = min(next_sample * self.sample_ms, self.end_ms)
            tr = next_round * self.round_ms if next_round * self.round_ms < self.end_ms else NEVER
            if self.s_due is not None and self.s_due < min(ts, tr):
                self._scan(min(ts, tr), tr if tr < NEVER else self.end_ms)
                continue
            tc = self.c_due if self.c_due is not None and self.s_due is None else NEVER
            if ts <= tr and ts <= tc:
                self._sample(ts)
                if ts >= self.end_ms:
                    break
                next_sample += 1
                if ts * 10 // self.end_ms > reported:
                    reported = ts * 10 // self.end_ms
                    self.progress(f"{self.name} {reported * 10}%")
            elif tr <= tc:
                self.clock.set_ms(tr)
                self._round(next_round)
                next_round += 1
            else:
                self.clock.set_ms(tc)
                self._crawl(tc, tr if tr < NEVER else self.end_ms)
        return self.samples

    def _sample(self, ts: int) -> None:
        """The state at `ts`: after every batch before it.  The engine may be ahead of the
        batches by a quiet slot, which moves pages_scanned only."""
        from lksmfs.engine.fastpass import scanned_at

        k = self.ksm
        scanned = k.stats.pages_scanned
        jumped = scanned_at(self.scanner.jumps, ts, k.tunables.pages_to_scan, k.tunables.sleep_millisecs)
        if jumped is not None:
            scanned = jumped  # inside passes a jump ran at once
        elif self.s_due is not None and self.clock.scan_ms is not None:
            batches = -(-(ts - self.clock.scan_ms) // k.tunables.sleep_millisecs)
            scanned = self.clock.scan_base + min(scanned - self.clock.scan_base,
                                                 batches * k.tunables.pages_to_scan)
        self.samples.append({"t_s": ts // 1000 if ts % 1000 == 0 else ts / 1000,
                             "pages_scanned": scanned, "pages_sharing": k.stable.pages_sharing})

    # -- the threads -----------------------------------------------------------------------

    def _crawl(self, now: int, hard_ms: int) -> None:
        """The crawler thread's pass at `now`; a scan it hands over starts its batches
        (and mainline's quiet passes until `hard_ms` run at once)."""
        k = self.ksm
        due = k.crawl(self.c_due_s if self.c_due_s is not None and self.c_due == now else now / 1000)
        self._same = self._same + 1 if self._last_crawl == now else 0
        self._last_crawl = now
        if self._same > 1000:
            raise EngineBusy(f"{self.name}: the crawler keeps asking for {now} ms")
        self._wake_at(now, due)
        if k.scanner_should_run() and self.s_due is None:
            self.s_due = now
            self.clock.scan_ms = now
            self.clock.scan_base = k.stats.pages_scanned
            self.carry = 0
            k.scanner.batch(0)  # its first batch begins: scan_starting() (scan_boost)
            if self.scanner.jump(now, hard_ms) is not None:
                self.s_due = None  # between passes again, after the last one it ran
                self.clock.scan_ms = None
                nxt = self.scanner.jumps[-1]
                self.clock.set_ms(nxt.end_ms(k.tunables.pages_to_scan, k.tunables.sleep_millisecs))
                self._wake_at(self.clock.now_ms, k.crawl(self.clock.now_ms / 1000))

    def _wake_at(self, now: int, due: float | None) -> None:
        """The crawler sleeps until `due` (None: until something wakes it)."""
        self.c_due = None if due is None else max(now, _ms(due))
        self.c_due_s = due

    def _woken(self, now: int) -> None:
        """Something woke the crawler (a scan's end, a hint, a request)."""
        self.c_due = now
        self.c_due_s = None

    def _scan(self, soft_ms: int, hard_ms: int) -> None:
        """ksmd's (or LKSM's scanner's) batches from s_due until `soft_ms`: the engine may
        run a quiet slot on past it, never past `hard_ms` (memory changes there)."""
        k = self.ksm
        t = k.tunables
        assert self.s_due is not None
        pts, sleep = t.pages_to_scan, t.sleep_millisecs
        nb_soft = -(-(soft_ms - self.s_due) // sleep)
        nb_hard = -(-(hard_ms - self.s_due) // sleep)
        soft = nb_soft * pts - self.carry
        if soft <= 0:
            self.carry = -soft
        else:
            res = self.scanner.run(soft, nb_hard * pts - self.carry)
            if res.wrapped:
                self._wrapped()
                return
            self.carry = res.scanned - soft
        self.s_due += nb_soft * sleep

    def _wrapped(self) -> None:
        """The batch that ended the scan: the crawler is woken then (and resourced sends
        its next request)."""
        now = self.clock.batch_ms()
        self.clock.scan_ms = None
        self.clock.set_ms(now)
        self.s_due = None
        self.carry = 0
        self._woken(now)
        self._request()

    def _request(self) -> None:
        """resourced: the next one_shot request once the last one is served."""
        if self.requests and self.ksm.tunables.one_shot_scanning == LKSM_SCAN_NONE:
            if self.request(self.requests.popleft()):
                self._woken(self.clock.now_ms)

    def _round(self, r: int) -> None:
        """Round r's changes: volatile pages, the timeline's events (the driver passes
        exits, freezes and thaws on to the engine), resourced's requests."""
        eff = self.advance_round(r)
        if self.ksm.policy == POLICY_LKSM:
            if eff.hints and self.s_due is None and self.ksm.tunables.run & KSM_RUN_MERGE:
                self._woken(self.clock.now_ms)  # the hint wakes the crawler
            if self.resourced:
                self.requests.extend(eff.one_shot or [LKSM_SCAN_FULL])
                self._request()
