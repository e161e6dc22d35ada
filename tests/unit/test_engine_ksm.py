"""Engine rules and phase scenarios, with counters worked out by hand from mm/ksm.c and
mm/lksm.c (comments give the derivation)."""

from __future__ import annotations

import pytest
from memfake import FakeSource, fill, unique

from lksmfs.engine.crawler import SKIP_DENIED, SKIP_SHORT
from lksmfs.engine.hashindex import HashIndex
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import KSM_MM_FROZEN, KSM_MM_LISTED, KSM_MM_NEWCOMER, KSM_MM_SCANNED
from lksmfs.engine.rmap import (
    BYTES_PER_ITEM,
    BYTES_PER_ITEM_NO_AGES,
    BYTES_PER_ITEM_NO_DIGESTS,
    BYTES_PER_ITEM_NO_FILTER,
)
from lksmfs.engine.stats import Skipped
from lksmfs.sources.base import AccessDenied, Mapping, TaskId, TaskStat

KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


class DenyingSource(FakeSource):
    """Processes /proc shuts us out of: their stat, or their maps (EACCES)."""

    def __init__(self) -> None:
        super().__init__()
        self.deny_stat: set[TaskId] = set()
        self.deny_maps: set[TaskId] = set()

    def stat(self, task: TaskId) -> TaskStat:
        if task in self.deny_stat:
            raise AccessDenied(f"{task} stat")
        return super().stat(task)

    def mappings(self, task: TaskId) -> list[Mapping]:
        if task in self.deny_maps:
            raise AccessDenied(f"{task} smaps")
        return super().mappings(task)


def counts(ksm: Ksm) -> tuple[int, int, int, int]:
    c = ksm.counters()
    return tuple(c[k] for k in KEYS)  # type: ignore[return-value]


def test_rmap_item_columns_fit_the_kernels_64_bytes() -> None:
    # vpn 8, flags 1, seq 1, cksum 4, node 4, region 4, off 4, age 1, skips 1, digest 8 + 4
    assert BYTES_PER_ITEM == 40 <= 64


@pytest.mark.parametrize("filter_enabled", [True, False])
@pytest.mark.parametrize("cpu_marks", [True, False])
def test_columns_are_kept_only_where_something_reads_them(filter_enabled: bool, cpu_marks: bool) -> None:
    """Without LKSM_FILTER nothing reads an item's region or offset (8 bytes); without a
    source that tells whether a process ran, nothing reads its digest (12 bytes); LKSM
    never reads smart_scan's age and skips (2 bytes)."""
    src = FakeSource()
    src.cpu_marks = cpu_marks
    t = src.anon("a", [fill("a")] * 10 + [unique(i) for i in range(10)])
    src.anon("b", [fill("a")] * 5)
    ksm = Ksm(src, filter_enabled=filter_enabled)
    for _ in range(3):
        ksm.full_scan()
    rmap = ksm.slots[t].rmap
    assert len(rmap) == 20
    per_item = BYTES_PER_ITEM - (0 if filter_enabled else 8) - (0 if cpu_marks else 12) - 2
    assert rmap.nbytes == 20 * per_item
    assert (BYTES_PER_ITEM_NO_FILTER, BYTES_PER_ITEM_NO_DIGESTS, BYTES_PER_ITEM_NO_AGES) == (
        BYTES_PER_ITEM - 8, BYTES_PER_ITEM - 12, BYTES_PER_ITEM - 2)
    assert counts(ksm) == (1, 14, 10, 0)


def test_the_first_merging_round_finds_its_unstable_tree_sized() -> None:
    """Round 1 only records checksums, so it leaves an empty unstable tree - no size for
    round 2's.  Sized instead from the digests of the items outside KSM pages (2 x 2000
    unique pages + 1000 contents found in both processes: 5000 distinct), the tree
    round 2 fills (the 4000 unique pages wait in it) is never rehashed on the way."""
    src = FakeSource()
    src.cpu_marks = True
    for p in range(2):
        src.anon(f"p{p}", [unique(10_000 * (p + 1) + i) for i in range(2000)] + [unique(i) for i in range(1000)])
    ksm = Ksm(src)
    ksm.full_scan()
    hint = ksm.scanner._unstable_hint
    assert 5000 * 0.98 <= hint <= 5000 * 1.02  # linear counting's error, 2^20 entries
    grown = []
    real = HashIndex._reserve

    def reserve(self: HashIndex, extra: int) -> None:
        cap = self.capacity
        real(self, extra)
        if self is ksm.unstable and self.capacity != cap:
            grown.append(cap)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HashIndex, "_reserve", reserve)
        ksm.full_scan()
    c = ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (1000, 1000, 4000)
    assert grown == []


def test_ltp_phases_with_unlimited_sharing() -> None:
    """LTP ksm01's shape: three processes of 64 pages, 'c' / 'a' / 'a'."""
    src = FakeSource()
    n = 64
    p1 = src.anon("p1", [fill("c")] * n)
    p2 = src.anon("p2", [fill("a")] * n)
    p3 = src.anon("p3", [fill("a")] * n)
    ksm = Ksm(src)
    ksm.tunables.max_page_sharing = 100000

    # round 1: every page gets its first checksum -> volatile, in no tree
    ksm.full_scan()
    assert counts(ksm) == (0, 0, 0, 3 * n)
    # round 2: checksums unchanged -> one KSM page per content: c (64 maps), a (128 maps)
    ksm.full_scan()
    assert counts(ksm) == (2, (n - 1) + (2 * n - 1), 0, 0)
    # round 3: nothing changed, nothing moves
    ksm.full_scan()
    assert counts(ksm) == (2, 190, 0, 0)
    assert ksm.counters()["full_scans"] == 3

    # phase 2: p2 rewritten with 'b': its 64 mappings leave 'a' (broken), form 'b'
    for off in range(n):
        src.set_page(p2, 0, off, fill("b"))
    ksm.full_scan()
    assert counts(ksm) == (3, 63 + 63 + 63, 0, 0)
    assert ksm.last_scan["broken"] == n
    assert ksm.last_scan["merged"] == n - 1

    # phase 3: p1 becomes all-unique: 'c' goes away, 64 pages wait in the unstable tree
    for off in range(n):
        src.set_page(p1, 0, off, unique(1000 + off))
    ksm.full_scan()
    assert counts(ksm) == (2, 126, n, 0)

    # phase 4: p3 exits; the crawler finds it gone at the next full scan and its items
    # leave with the slot when that scan ends: 'a' is gone
    src.kill(p3)
    ksm.full_scan()
    assert counts(ksm) == (1, 63, n, 0)
    assert ksm.counters()["scanning_process"] == 2
    assert ksm.counters()["rmap_items"] == 2 * n
    assert p3 in src.released


def test_small_max_page_sharing_builds_chains() -> None:
    """12 identical pages, max_page_sharing 2: six KSM pages of two mappings, all dups of
    one chain (stable_tree_insert() chains a node whose content already has full nodes)."""
    src = FakeSource()
    for name in ("p1", "p2", "p3"):
        src.anon(name, [fill("a")] * 4)
    ksm = Ksm(src)
    ksm.tunables.max_page_sharing = 2
    ksm.full_scan()
    ksm.full_scan()
    c = ksm.counters()
    assert counts(ksm) == (6, 6, 0, 0)
    assert (c["stable_node_chains"], c["stable_node_dups"]) == (1, 6)


def test_odd_page_out_waits_in_the_unstable_tree_when_all_dups_are_full() -> None:
    """5 identical pages, max 2: pairs (0,1) (2,3) merge; page 4 finds every dup full and
    nobody in the unstable tree, so it stays unshared, round after round."""
    src = FakeSource()
    src.anon("p", [fill("z")] * 5)
    ksm = Ksm(src)
    ksm.tunables.max_page_sharing = 2
    for _ in range(4):
        ksm.full_scan()
    assert counts(ksm) == (2, 2, 1, 0)
    assert (ksm.counters()["stable_node_chains"], ksm.counters()["stable_node_dups"]) == (1, 2)


def test_chain_freed_when_its_dups_go() -> None:
    src = FakeSource()
    a = src.anon("a", [fill("q")] * 2)
    b = src.anon("b", [fill("q")] * 2)
    src.anon("keep", [unique(9)])  # somebody left to scan once a and b are gone
    ksm = Ksm(src)
    ksm.tunables.max_page_sharing = 2
    ksm.full_scan()
    ksm.full_scan()
    assert ksm.counters()["stable_node_dups"] == 2
    src.kill(a)
    src.kill(b)
    ksm.full_scan()  # their slots are freed when the scan of 'keep' wraps up
    c = ksm.counters()
    assert counts(ksm) == (0, 0, 1, 0)
    assert (c["stable_node_chains"], c["stable_node_dups"]) == (0, 0)
    assert not ksm.has_stable_nodes()


def test_checksum_gate_keeps_a_changing_page_volatile_in_initial_rounds() -> None:
    src = FakeSource()
    p = src.anon("p", [unique(1), unique(2)])
    src.anon("q", [unique(1), unique(3)])
    ksm = Ksm(src)
    ksm.full_scan()  # round 1: all volatile
    src.set_page(p, 0, 1, unique(4))  # p's second page changes between the visits
    ksm.full_scan()  # round 2: p/0 and q/0 merge; q/1 enters the unstable tree; p/1 volatile
    assert counts(ksm) == (1, 1, 1, 1)
    ksm.full_scan()  # round 3: the gate is gone (scan_round == initial_round)
    assert counts(ksm) == (1, 1, 2, 0)


def test_frozen_newcomers_skip_the_checksum_and_merge_in_their_first_scan() -> None:
    src = FakeSource()
    pages = [unique(i) for i in range(8)]
    a = src.anon("a", pages)
    b = src.anon("b", pages)
    ksm = Ksm(src)
    ksm.hint(a, True)  # unknown tasks: onto the frozen task list
    ksm.hint(b, True)
    assert set(ksm.crawler.frozen_tasks) == {a, b}
    ksm.full_scan()
    assert counts(ksm) == (8, 8, 0, 0)
    # frozen-scanned slots end up neither frozen nor listed (the seed clears FROZEN only)
    for t in (a, b):
        st = ksm.slots[t].state
        assert st & KSM_MM_SCANNED and not st & (KSM_MM_FROZEN | KSM_MM_LISTED | KSM_MM_NEWCOMER)


def test_short_tasks_are_not_registered() -> None:
    src = FakeSource()
    src.anon("short", [fill("a")] * 2, runtime_ms=99)
    src.anon("long", [fill("a")] * 2, runtime_ms=100)
    ksm = Ksm(src)
    ksm.full_scan()
    assert ksm.counters()["scanning_process"] == 1
    assert [s.comm for s in ksm.slots.values()] == ["long"]


def test_skipped_tasks_say_why() -> None:
    """Ksm.skipped: what the last prepared scan left out (check_short_task with the
    task's CPU time; /proc refusing its stat or its maps), replaced at every prepare."""
    src = DenyingSource()
    short = src.anon("short", [fill("a")] * 2, runtime_ms=99)
    src.anon("long", [fill("a")] * 2, runtime_ms=100)
    hidden_stat = src.anon("nostat", [fill("a")] * 2)
    hidden_maps = src.anon("nomaps", [fill("a")] * 2)
    src.deny_stat.add(hidden_stat)
    src.deny_maps.add(hidden_maps)
    ksm = Ksm(src)
    ksm.full_scan()
    assert ksm.skipped == {
        short: Skipped("short", SKIP_SHORT, 99 * 10**6),
        hidden_stat: Skipped("", SKIP_DENIED),
        hidden_maps: Skipped("nomaps", SKIP_DENIED),
    }
    assert [s.comm for s in ksm.slots.values()] == ["long"]  # the denied slot left at the scan's end
    src.kill(short)
    src.deny_stat.clear()
    ksm.full_scan()
    assert set(ksm.skipped) == {hidden_maps}  # this scan's reasons only
    assert sorted(s.comm for s in ksm.slots.values()) == ["long", "nostat"]


def test_short_task_threshold_is_the_engines() -> None:
    """short_task_ms=0 (`lksmfs scan --include-short-tasks`) scans a 1 ms task; the
    default is LKSM's 100 ms (test_short_tasks_are_not_registered)."""
    src = FakeSource()
    src.anon("short", [fill("a")] * 2, runtime_ms=1)
    ksm = Ksm(src, short_task_ms=0)
    ksm.full_scan()
    assert [s.comm for s in ksm.slots.values()] == ["short"] and ksm.skipped == {}


def test_exit_is_deferred_to_the_end_of_the_scan() -> None:
    src = FakeSource()
    a = src.anon("a", [fill("a")] * 3)
    src.anon("b", [fill("a")] * 3)
    ksm = Ksm(src)
    ksm.full_scan()
    ksm.full_scan()
    assert counts(ksm) == (1, 5, 0, 0)
    src.kill(a)
    n = ksm.prepare_full_scan()
    # the crawler saw the exit: one process less at once, but a's 3 mappings stay
    # counted while its slot waits on the remove list
    assert n == 1
    assert ksm.counters()["scanning_process"] == 1
    assert (ksm.stable.pages_shared, ksm.stable.pages_sharing) == (1, 5)
    ksm._run_sync(n)
    assert counts(ksm) == (1, 2, 0, 0)


def test_process_gone_mid_scan_is_dropped_and_counted() -> None:
    src = FakeSource()
    a = src.anon("a", [fill("a")] * 3)
    b = src.anon("b", [fill("a")] * 3)
    ksm = Ksm(src)
    ksm.full_scan()
    ksm.full_scan()
    ksm.prepare_full_scan()
    ksm.scanner.wake()
    ksm.scanner.sync = True
    ksm.scan_batch(1)  # a is being scanned
    assert ksm.cur is not None and ksm.cur.task == a
    src.kill(a)  # ... and exits under the scanner
    while ksm.scan_state:
        ksm.scan_batch(1)
    assert counts(ksm) == (1, 2, 0, 0)
    assert ksm.counters()["tasks_exited"] == 1
    assert list(ksm.slots) == [b]


def test_run_2_unmerges_everything_and_keeps_slots() -> None:
    src = FakeSource()
    src.anon("a", [fill("a")] * 3)
    src.anon("b", [unique(7)] * 1)
    ksm = Ksm(src)
    ksm.full_scan()
    ksm.full_scan()
    assert counts(ksm) == (1, 2, 1, 0)
    ksm.set_run(2)
    assert counts(ksm) == (0, 0, 0, 0)
    assert ksm.counters()["rmap_items"] == 0
    assert ksm.counters()["scanning_process"] == 2


def test_use_zero_pages_merges_zero_pages_with_the_zero_page() -> None:
    src = FakeSource()
    p = src.anon("p", [bytes(4096)] * 3 + [fill("x")])
    ksm = Ksm(src)
    ksm.tunables.use_zero_pages = 1
    ksm.full_scan()
    ksm.full_scan()
    c = ksm.counters()
    # three zero pages go to the zero page (no KSM page); 'x' waits unshared
    assert counts(ksm) == (0, 0, 1, 3)
    assert c["ksm_zero_pages"] == 3
    ksm.full_scan()  # they are no longer anonymous: their rmap items go
    assert counts(ksm) == (0, 0, 1, 0)
    assert ksm.counters()["ksm_zero_pages"] == 3
    src.set_page(p, 0, 0, fill("x"))  # a write brings one back as an anon page
    ksm.full_scan()
    assert ksm.counters()["ksm_zero_pages"] == 2
    assert counts(ksm) == (1, 1, 0, 0)


@pytest.mark.parametrize("use_zero", [0, 1])
def test_general_profit_formula(use_zero: int) -> None:
    src = FakeSource()
    src.anon("a", [fill("a")] * 4 + [bytes(4096)] * 2)
    ksm = Ksm(src)
    ksm.tunables.use_zero_pages = use_zero
    ksm.full_scan()
    ksm.full_scan()
    c = ksm.counters()
    assert c["general_profit"] == (c["pages_sharing"] + c["ksm_zero_pages"]) * 4096 - c["rmap_items"] * 64
