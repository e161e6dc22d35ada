"""The KSM advisor (mm/ksm.c 6.7+, lksmfs.engine.advisor) on a virtual clock: the files'
validation, and pages_to_scan after each full scan worked out by hand from
scan_time_advisor() (integer arithmetic, every step written out in the comments)."""

from __future__ import annotations

import errno

import pytest
from memfake import FakeSource, fill, unique

from lksmfs.engine.advisor import AdvisorCtx, ewma, scan_time_advisor, set_advisor_defaults
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import Tunables
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.sysfs.attrs import KSM_FILES, AttributeTable, SettingError, apply_settings, check_setting
from lksmfs.workload.driver import VirtualClock

BASE = 0x10000000


def proc(src: FakeSource, name: str, pages: list[bytes]) -> TaskId:
    """A process with one madvised (VM_MERGEABLE) anonymous mapping."""
    return src.add(name, [(Mapping(BASE, BASE + len(pages) * PAGE_SIZE, vm_mergeable=True), dict(enumerate(pages)))])


def scan_time_on() -> Tunables:
    t = Tunables()
    t.advisor_mode = 1
    set_advisor_defaults(AdvisorCtx(), t)
    return t


def test_ewma_weighs_the_new_figure_30_percent() -> None:
    assert ewma(0, 100) == 30  # (70*0 + 30*100)/100
    assert ewma(30, 200) == 81  # (2100 + 6000)/100
    assert ewma(81, 4000) == 1256  # (5670 + 120000)/100 = 1256.7, truncated


def test_scan_time_advisor_by_hand() -> None:
    """Four scans at the defaults (target 200 s, max_cpu 70 %, min CPU 10 %, max 30000
    pages), the last with advisor_max_pages_to_scan lowered to 2000."""
    t = scan_time_on()
    ctx = AdvisorCtx()
    assert t.pages_to_scan == 500  # advisor_min_pages_to_scan: where it starts
    # scan 1: 10.0 s -> 15.5 s: 5500 ms -> scan_time 5; 300 ms CPU since 0 -> 30000/5000 = 6 %
    # factor 20000/5 = 4000; change 500/5 = 100 -> ewma(0, 100) = 30
    # pages 50000/4000 = 12 -> 12*30/100 = 3; per-page cost 500/6 = 83
    # min(3, 83*70) = 3 -> max(3, 83*10 = 830) -> min(830, 30000) = 830
    ctx.start_scan = 10.0
    step = scan_time_advisor(ctx, t, 15.5, 300_000_000)
    assert (step.scan_time, step.cpu_percent, t.pages_to_scan) == (5, 6, 830)
    assert (ctx.scan_time, ctx.change, ctx.cpu_time) == (5, 30, 300_000_000)
    # scan 2: 15.52 -> 25.6 s: 10080 ms -> 10 s; CPU 600 ms -> 60000/10000 = 6 %
    # factor 2000; change 1000/5 = 200 -> ewma(30, 200) = 81; pages 83000/2000 = 41 -> 33
    # cost 830/6 = 138: max(33, 1380) = 1380
    ctx.start_scan = 15.52
    scan_time_advisor(ctx, t, 25.6, 900_000_000)
    assert t.pages_to_scan == 1380
    # scan 3: 30 -> 430 s: 400 s; CPU 100000 ms -> 10^7/400000 = 25 %
    # factor 20000/400 = 50; change 40000/10 = 4000 -> ewma(81, 4000) = 1256
    # pages 138000/50 = 2760 -> 2760*1256/100 = 34665; cost 1380/25 = 55
    # min(34665, 55*70 = 3850) = 3850: the CPU cap
    ctx.start_scan = 30.0
    step = scan_time_advisor(ctx, t, 430.0, 100_900_000_000)
    assert (step.scan_time, step.cpu_percent, t.pages_to_scan) == (400, 25, 3850)
    # scan 4, advisor_max_pages_to_scan 2000: 430 -> 630.9 s: 200 s; CPU 10000 ms -> 5 %
    # factor 100; change 20000/400 = 50 -> ewma(1256, 50) = 894; pages 3850 -> 34419
    # cost 3850/5 = 770: min(34419, 53900), max(.., 7700) = 34419 -> min(34419, 2000)
    t.advisor_max_pages_to_scan = 2000
    ctx.start_scan = 430.0
    scan_time_advisor(ctx, t, 630.9, 110_900_000_000)
    assert (t.pages_to_scan, ctx.change) == (2000, 894)


def test_c_arithmetic_wraps_and_truncates() -> None:
    """pages_to_scan * 100 is unsigned int arithmetic (wraps at 2^32); advisor_max_cpu's
    product and the result are unsigned long, stored into the unsigned int."""
    t = scan_time_on()
    t.pages_to_scan = 50_000_000  # *100 = 5e9 -> 5e9 - 2^32 = 705032704
    t.advisor_max_pages_to_scan = 2**64 - 1
    t.advisor_max_cpu = 4294967295
    ctx = AdvisorCtx(start_scan=0.0, scan_time=1, change=100)
    # scan_time 1 (0.5 s), CPU 0 -> 1 %; factor 20000; change 100 -> ewma(100, 100) = 100
    # pages 705032704/20000 = 35251 -> 35251; cost 50e6/1 = 50e6
    # min(35251, 50e6*(2^32-1)) = 35251 -> max(35251, 5e8) = 500000000
    scan_time_advisor(ctx, t, 0.5, 0)
    assert t.pages_to_scan == 500_000_000


def on_clock(src: FakeSource, cpu: list[int]) -> tuple[Ksm, AttributeTable[Ksm], VirtualClock]:
    clock = VirtualClock()
    ksm = Ksm(src, policy="ksm", clock=clock, scan_cpu_ns=lambda: cpu[0])
    ksm.tunables.smart_scan = 0
    return ksm, AttributeTable(ksm), clock


def seven_hundred_pages() -> FakeSource:
    """Two madvised processes of 350 pages: a pass of 700 pages."""
    src = FakeSource()
    proc(src, "a", [fill("a")] * 350)
    proc(src, "b", [unique(i) for i in range(350)])
    return src


def pass_starts(ksm: Ksm, clock: VirtualClock, now: float) -> None:
    clock.now = now
    ksm.crawl(now)
    assert ksm.scanner_should_run()


def test_engine_retunes_after_each_full_scan_on_a_virtual_clock() -> None:
    """ksmd's passes over 700 pages (two processes of 350), the scanner's CPU time given:
    the advisor times each pass from its first batch to the batch that wraps, run=0 in
    between does not restart the timing, and a pass done in one batch takes 1 s."""
    cpu = [0]
    ksm, table, clock = on_clock(seven_hundred_pages(), cpu)
    table.store("advisor_mode", b"scan-time\n")
    assert table.show("advisor_mode") == b"none [scan-time]\n" and table.show("pages_to_scan") == b"500\n"
    table.store("run", b"1\n")
    # pass 1: first batch at 10.0 s (500 pages), the wrap at 13.7 s after 250 ms of CPU:
    # 3700 ms -> 3 s; 25000/3000 = 8 %; factor 20000/3 = 6666; change 300/3 = 100 -> 30
    # pages 50000/6666 = 7 -> 7*30/100 = 2; cost 500/8 = 62 -> max(2, 620) = 620
    pass_starts(ksm, clock, 10.0)
    ksm.scan_batch()
    assert ksm.scan_state and ksm.counters()["full_scans"] == 0
    clock.now, cpu[0] = 13.7, 250_000_000
    ksm.scan_batch()
    assert ksm.counters()["full_scans"] == 1 and ksm.tunables.pages_to_scan == 620
    # pass 2 from 20.0 s (620 pages), stopped by run=0 and resumed: still timed from 20.0
    # wrap at 22.9 s, 400 ms CPU: 2900 ms -> 2 s; 15000/2000 = 7 %; factor 10000;
    # change 200/3 = 66 -> ewma(30, 66) = 40; pages 62000/10000 = 6 -> 2; cost 620/7 = 88
    # -> max(2, 880) = 880
    pass_starts(ksm, clock, 20.0)
    ksm.scan_batch()
    clock.now = 21.0
    table.store("run", b"0\n")
    ksm.scan_batch()  # run=0: the pass stops where it is (not a wrap)
    assert ksm.tunables.pages_to_scan == 620
    table.store("run", b"1\n")
    pass_starts(ksm, clock, 22.0)
    clock.now, cpu[0] = 22.9, 400_000_000
    while ksm.scanner_should_run():
        ksm.scan_batch()
    assert ksm.counters()["full_scans"] == 2 and ksm.tunables.pages_to_scan == 880
    # pass 3 at 30.0 s: 880 >= 700 pages, one batch wraps at once: 0 s -> 1 s; 5 ms CPU
    # -> 0 % -> 1 %; factor 20000; change 100/2 = 50 -> ewma(40, 50) = 43;
    # pages 88000/20000 = 4 -> 1; cost 880 -> max(1, 8800) = 8800
    pass_starts(ksm, clock, 30.0)
    cpu[0] = 405_000_000
    ksm.scan_batch()
    assert ksm.counters()["full_scans"] == 3 and ksm.tunables.pages_to_scan == 8800
    # the same mode again changes nothing; none puts back 100; scan-time again restarts
    table.store("advisor_mode", b"scan-time")
    assert ksm.tunables.pages_to_scan == 8800 and ksm.advisor.change == 43
    table.store("advisor_mode", b"none\n")
    assert table.show("advisor_mode") == b"[none] scan-time\n" and ksm.tunables.pages_to_scan == 100
    table.store("advisor_min_pages_to_scan", b"300\n")
    table.store("advisor_mode", b"scan-time\n")
    assert ksm.tunables.pages_to_scan == 300 and ksm.advisor == AdvisorCtx()


def test_switched_on_mid_pass_the_first_figures_count_from_zero() -> None:
    """set_advisor_defaults() zeroes start_scan and cpu_time: a pass already under way
    when the advisor is switched on is timed from 0 of the clock, and its CPU is every
    ns the scanner used."""
    cpu = [0]
    ksm, table, clock = on_clock(seven_hundred_pages(), cpu)
    table.store("run", b"1\n")
    pass_starts(ksm, clock, 40.0)
    ksm.scan_batch()  # 100 pages (the default), no advisor yet
    clock.now = 41.0
    table.store("advisor_mode", b"scan-time\n")  # pages_to_scan 500
    clock.now = 42.0
    ksm.scan_batch()  # 500 more: 600
    clock.now, cpu[0] = 43.25, 2_000_000_000
    ksm.scan_batch()  # the last 100 and the wrap
    # 43250 ms -> 43 s; 2000 ms CPU -> 200000/43000 = 4 %; factor 20000/43 = 465;
    # change 4300/43 = 100 -> 30; pages 50000/465 = 107 -> 32; cost 500/4 = 125 -> 1250
    assert ksm.counters()["full_scans"] == 1 and ksm.tunables.pages_to_scan == 1250


def test_the_advisor_files_and_their_errnos() -> None:
    """The kernel's five files at their defaults; every bad write EINVAL with nothing
    changed (values checked against this host's 6.18 kernel)."""
    src = FakeSource()
    ksm, table, _ = on_clock(src, [0])
    assert table.names() == list(KSM_FILES) and KSM_FILES[-5:] == (
        "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
        "advisor_target_scan_time")
    assert {n: table.show(n) for n in KSM_FILES[-5:]} == {
        "advisor_mode": b"[none] scan-time\n", "advisor_max_cpu": b"70\n", "advisor_min_pages_to_scan": b"500\n",
        "advisor_max_pages_to_scan": b"30000\n", "advisor_target_scan_time": b"200\n"}
    before = {n: table.show(n) for n in table.names()}
    bad = [("advisor_mode", b"scan-time\n\n"), ("advisor_mode", b"Scan-time\n"), ("advisor_mode", b" none\n"),
           ("advisor_mode", b"none \n"), ("advisor_mode", b"1\n"), ("advisor_mode", b"\n"),
           ("advisor_max_cpu", b"18446744073709551616\n"), ("advisor_max_cpu", b"-1\n"),
           ("advisor_max_cpu", b"0x10\n"), ("advisor_max_cpu", b" 5\n"), ("advisor_max_cpu", b"5 \n"),
           ("advisor_target_scan_time", b"0\n"), ("advisor_target_scan_time", b"18446744073709551616\n"),
           ("advisor_min_pages_to_scan", b"-0\n"), ("advisor_max_pages_to_scan", b"x\n")]
    for name, data in bad:
        with pytest.raises(OSError) as e:
            table.store(name, data)
        assert e.value.errno == errno.EINVAL, (name, data)
    assert {n: table.show(n) for n in table.names()} == before
    # accepted: the unsigned long is cut to advisor_max_cpu's unsigned int; NUL ends a store
    table.store("advisor_max_cpu", b"4294967297\n")
    table.store("advisor_max_cpu", b"+5\n")
    assert table.show("advisor_max_cpu") == b"5\n"
    table.store("advisor_max_cpu", b"4294967297\n")
    assert table.show("advisor_max_cpu") == b"1\n"
    table.store("advisor_min_pages_to_scan", b"18446744073709551615\n")
    table.store("advisor_max_pages_to_scan", b"0\n")
    table.store("advisor_target_scan_time", b"1\n")
    table.store("advisor_mode", b"scan-time\x00junk")
    assert table.show("advisor_mode") == b"none [scan-time]\n"
    assert table.show("pages_to_scan") == b"4294967295\n"  # 2^64-1 stored into the unsigned int
    # with the advisor on, pages_to_scan refuses every write, good ones too
    for data in (b"100\n", b"abc\n"):
        with pytest.raises(OSError) as e:
            table.store("pages_to_scan", data)
        assert e.value.errno == errno.EINVAL
    table.store("advisor_mode", b"none")
    table.store("pages_to_scan", b"100\n")


def test_initial_values_name_the_mode_and_come_before_run() -> None:
    """`tunables:` / --set: advisor_mode is a word; a bad one names the file and why;
    pages_to_scan is applied before the advisor takes it over."""
    assert check_setting("advisor_mode", "scan-time", "cfg: tunables.advisor_mode", "ksm") == 1
    with pytest.raises(SettingError, match=r"cfg: tunables.advisor_mode: must be none or scan-time \(got on\)"):
        check_setting("advisor_mode", "on", "cfg: tunables.advisor_mode", "ksm")
    with pytest.raises(SettingError, match="only under policy ksm"):
        check_setting("advisor_mode", "none", "x", "lksm")
    ksm, table, _ = on_clock(FakeSource(), [0])
    apply_settings(table, {"advisor_mode": 1, "pages_to_scan": 77, "advisor_min_pages_to_scan": 640, "run": 1})
    assert ksm.tunables.advisor_mode == 1 and ksm.tunables.pages_to_scan == 640 and ksm.tunables.run == 1
