"""No request may wedge the engine (issue 8, part 1).

A one-shot request, once accepted, must end: with a scan, or at once with the seed's
"No one can be scanned!" path.  The sequences that used to leave `one_shot_scanning`
stuck are tested one by one, then a state machine plays random interleavings of run,
one_shot_scanning, hints, freezes, thaws, exits and new processes, and checks after
every step that the counters agree with the rmap items they count, and that every
accepted request completes within a bounded number of crawler/scanner steps.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from drive import STEP_BOUND, booted, settle
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from memfake import FakeSource, fill, unique

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import KSM_MM_FROZEN, KSM_MM_LISTED
from lksmfs.engine.rmap import STABLE, UNSTABLE
from lksmfs.sources.base import TaskId
from lksmfs.sysfs.attrs import AttributeTable
from lksmfs.workload.driver import VirtualClock


def request(table: AttributeTable, mode: int) -> None:
    table.store("one_shot_scanning", f"{mode}\n".encode())


# -- the sequences of the issue, one by one --------------------------------------------


@pytest.mark.parametrize("readable", [True, False], ids=["out-of-scope", "unknown"])
def test_hint_for_a_task_the_source_cannot_scan_does_not_wedge_a_partial_request(readable: bool) -> None:
    """A hint for a task outside the scope (the freezer watcher or the hint file let it
    through) lands on the frozen task list; the prepare may not join it (the source
    never lists it), so nothing is queued and the request ends at once."""
    src = FakeSource()
    src.anon("p", [fill("a")] * 2)
    ksm, table, clock = booted(src)
    if readable:  # a live process, readable, but outside --pid/--cgroup
        outsider = src.anon("outsider", [fill("a")] * 2)
        src.hidden.add(outsider)
    else:
        outsider = TaskId(4242, 7)
    ksm.hint(outsider, True)
    request(table, 1)
    settle(ksm, clock)
    assert table.show("one_shot_scanning") == b"0\n"
    assert outsider not in ksm.slots and not ksm.crawler.frozen_tasks
    request(table, 2)  # and the next request is accepted and runs
    settle(ksm, clock)
    assert table.show("full_scans") == b"4\n" and table.show("one_shot_scanning") == b"0\n"


def test_every_queued_task_exits_between_prepare_and_scan() -> None:
    """The scanner is woken with a queue that exits empty before its first batch: it
    must still wrap the scan up (the seed's !ksmd_should_run() path)."""
    src = FakeSource()
    p = src.anon("p", [fill("a")] * 2)
    q = src.anon("q", [fill("a")] * 2)
    ksm, table, clock = booted(src)
    ksm.hint(q, True)
    request(table, 1)
    clock.now = ksm.crawl(clock.now)  # the crawler batches frozen events for 100 ms
    ksm.crawl(clock.now)
    assert ksm.scan_state and ksm.scanner.queued() == 1
    src.kill(q)
    ksm.task_exit(q)  # the daemon learns of the exit
    assert ksm.scanner.queued() == 0
    settle(ksm, clock)
    assert table.show("one_shot_scanning") == b"0\n" and not ksm.scan_state
    assert list(ksm.slots) == [p] and not ksm.mm.remove_list  # freed by the wrap-up


def test_run_2_with_a_frozen_slot_queued_then_a_partial_request_completes() -> None:
    """run=2 while a frozen slot waits: the unmerge keeps the queue and the states, so
    the partial request after run=8 scans that slot (and only it), and ends."""
    src = FakeSource()
    src.anon("p", [fill("a"), unique(1)])
    q = src.anon("q", [fill("a"), unique(2)])
    ksm, table, clock = booted(src)
    ksm.hint(q, True)
    assert ksm.slots[q].state & KSM_MM_FROZEN and ksm.mm.nr_frozen() == 1
    table.store("run", b"2\n")
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["rmap_items"]) == (0, 0, 0)
    table.store("run", b"8\n")
    request(table, 1)
    settle(ksm, clock)
    assert table.show("one_shot_scanning") == b"0\n"
    assert ksm.last_scan["mode"] == 1 and ksm.last_scan["slots_scanned"] == 1
    assert ksm.counters()["rmap_items"] == 2  # q's two pages, unstable or volatile
    assert ksm.slots[q].state & (KSM_MM_FROZEN | KSM_MM_LISTED) == 0  # scanned as frozen


def test_run_2_during_a_scan_cancels_it_and_the_next_request_completes() -> None:
    src = FakeSource()
    for i in range(3):
        src.anon(f"p{i}", [fill("a"), unique(i)] * 4)
    ksm, table, clock = booted(src)
    request(table, 2)
    ksm.crawl(clock.now)
    ksm.scan_batch(3)  # in the middle of the first slot
    assert ksm.scan_state and ksm.cur is not None
    table.store("run", b"2\n")
    assert not ksm.scan_state and table.show("one_shot_scanning") == b"0\n"
    assert ksm.scanner.queued() == 3  # the interrupted slot is back at the head
    table.store("run", b"8\n")
    request(table, 2)
    settle(ksm, clock)
    assert table.show("one_shot_scanning") == b"0\n"
    assert ksm.last_scan["slots_scanned"] == 3
    assert table.show("full_scans") == b"4\n"


def test_a_second_request_while_one_is_pending_is_einval_and_changes_nothing() -> None:
    src = FakeSource()
    src.anon("p", [fill("a")])
    ksm, table, clock = booted(src)
    request(table, 1)
    with pytest.raises(OSError) as e:
        request(table, 2)
    assert e.value.errno == errno.EINVAL
    assert table.show("one_shot_scanning") == b"1\n"


# -- random interleavings --------------------------------------------------------------


def check_consistent(ksm: Ksm) -> None:
    """The published counters against the items they count (between two slots)."""
    c = ksm.counters()
    for k in ("pages_shared", "pages_sharing", "pages_unshared", "rmap_items", "ksm_zero_pages"):
        assert c[k] >= 0, (k, c)
    # an exit drops scanning_process at once (__ksm_exit), also for the slot under the
    # cursor, which stays registered until the scanner meets the exit
    assert c["scanning_process"] == sum(not s.exited for s in ksm.slots.values())
    if ksm.scanner.gen is not None:
        return  # a slot half scanned: its old and new items are both alive
    slots = [*ksm.slots.values(), *ksm.mm.remove_list]
    flags = [s.rmap.flags for s in slots]
    assert c["rmap_items"] == sum(len(f) for f in flags)
    assert c["pages_unshared"] == sum(int(np.count_nonzero(f & UNSTABLE)) for f in flags)
    stable_items = sum(int(np.count_nonzero(f & STABLE)) for f in flags)
    assert stable_items == c["pages_shared"] + c["pages_sharing"]
    nlen = ksm.stable.nlen[: ksm.stable._next_id]
    assert c["pages_shared"] == int(np.count_nonzero(nlen > 0))
    assert c["ksm_zero_pages"] == sum(int(s.zero_vpns.shape[0]) for s in slots)
    assert c["pages_volatile"] == c["rmap_items"] - c["pages_shared"] - c["pages_sharing"] - c["pages_unshared"]


CONTENTS = [fill("a"), fill("b"), unique(1), unique(2), bytes(4096)]


class RequestMachine(RuleBasedStateMachine):
    """run / one_shot_scanning / hint / freeze / exit / thaw / new processes / writes."""

    @initialize(n=st.integers(1, 4), data=st.data(), boot=st.booleans())
    def boot(self, n: int, data: st.DataObject, boot: bool) -> None:
        self.src = FakeSource()
        self.dead: list[TaskId] = []
        for i in range(n):
            self._spawn(data, f"p{i}")
        self.clock = VirtualClock()
        self.ksm = Ksm(self.src, clock=self.clock)
        self.table = AttributeTable(self.ksm)
        self.table.store("use_zero_pages", data.draw(st.sampled_from([b"0\n", b"1\n"])))
        if boot:  # start from a device past its initial rounds, in one-shot mode
            self.table.store("run", b"8\n")
            settle(self.ksm, self.clock)

    def _spawn(self, data: st.DataObject, name: str) -> None:
        pages = data.draw(st.lists(st.sampled_from(CONTENTS), min_size=1, max_size=6))
        short = data.draw(st.booleans().map(lambda b: 10 if b else 1000))
        self.src.anon(name, pages, runtime_ms=short)

    def _tasks(self) -> list[TaskId]:
        return list(self.src.procs)

    @rule(value=st.sampled_from([b"0\n", b"1\n", b"2\n", b"8\n"]))
    def store_run(self, value: bytes) -> None:
        self.table.store("run", value)

    @rule(mode=st.sampled_from([1, 2]))
    def store_one_shot(self, mode: int) -> None:
        pending = self.ksm.tunables.one_shot_scanning
        try:
            request(self.table, mode)
        except OSError as e:
            assert e.errno == errno.EINVAL and pending != 0
            assert self.ksm.tunables.one_shot_scanning == pending  # state unchanged
        else:
            assert pending == 0

    @rule(data=st.data(), frozen=st.booleans())
    def hint(self, data: st.DataObject, frozen: bool) -> None:
        pool = [*self._tasks(), *self.dead, TaskId(9000, 1)]  # live, exited, never ours
        self.ksm.hint(data.draw(st.sampled_from(pool)), frozen)

    @precondition(lambda self: bool(self.src.procs))
    @rule(data=st.data(), tell=st.booleans())
    def exit(self, data: st.DataObject, tell: bool) -> None:
        task = data.draw(st.sampled_from(self._tasks()))
        self.src.kill(task)
        self.dead.append(task)
        if tell:  # the daemon may learn of it (freezer watcher) or only find it gone
            self.ksm.task_exit(task)

    @rule(data=st.data())
    def spawn(self, data: st.DataObject) -> None:
        self._spawn(data, f"n{len(self.src.procs) + len(self.dead)}")

    @precondition(lambda self: bool(self.src.procs))
    @rule(data=st.data())
    def leave_scope(self, data: st.DataObject) -> None:
        """The task stays alive and readable, but leaves --pid/--cgroup."""
        self.src.hidden.add(data.draw(st.sampled_from(self._tasks())))

    @precondition(lambda self: bool(self.src.procs))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(self._tasks()))
        n = len(self.src.procs[task].vmas[0].pages)
        off = data.draw(st.integers(0, max(0, n - 1)))
        self.src.set_page(task, 0, off, data.draw(st.sampled_from(CONTENTS)))

    @rule(steps=st.integers(1, 6), budget=st.sampled_from([1, 3, 100]), dt=st.sampled_from([0.0, 0.1, 1.5]))
    def step(self, steps: int, budget: int, dt: float) -> None:
        """A few steps of both threads, possibly stopping in the middle of a slot."""
        for _ in range(steps):
            if self.ksm.scanner_should_run():
                self.ksm.scan_batch(budget)
            else:
                self.ksm.crawl(self.clock.now)
            self.clock.now += dt

    @rule()
    def settle_one_shot(self) -> None:
        """Under run=8 every accepted request ends within STEP_BOUND steps, and so does
        any scan in progress."""
        if self.table.show("run") != b"8\n":
            return
        settle(self.ksm, self.clock)
        assert self.ksm.tunables.one_shot_scanning == 0
        assert not self.ksm.scan_state

    @rule()
    def periodic_scan_ends(self) -> None:
        """Under run=1 the crawler never idles, but a scan it starts always ends."""
        if self.table.show("run") != b"1\n":
            return
        for _ in range(STEP_BOUND):
            if self.ksm.scanner_should_run():
                self.ksm.scan_batch()
            elif not self.ksm.scan_state:
                break
        assert not self.ksm.scan_state

    @invariant()
    def counters_consistent(self) -> None:
        if hasattr(self, "ksm"):
            check_consistent(self.ksm)

    def teardown(self) -> None:
        if not hasattr(self, "ksm"):
            return
        # from any state, run=8 and one request: it completes
        self.table.store("run", b"8\n")
        settle(self.ksm, self.clock)
        request(self.table, 1)
        settle(self.ksm, self.clock)
        assert self.ksm.tunables.one_shot_scanning == 0 and not self.ksm.scan_state
        check_consistent(self.ksm)


RequestMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_requests_never_wedge = RequestMachine.TestCase
