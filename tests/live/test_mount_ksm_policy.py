"""`lksmfs mount --policy ksm`: mainline's files and semantics, driven the way mainline
clients drive the kernel's - LTP ksm01's phases by `echo` and `cat`, node_exporter's
ksmd collector - on real madvised processes.

The children are mergeable for the kernel's KSM too, so each test holds the kernel
oracle's lock while they live (another test's oracle would count them), and the
kernel's settings are put back afterwards (KernelKsm).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.exporter import node_exporter, node_exporter_binary, samples, scrape, value
from testkit.kernel_ksm import KernelKsm
from testkit.memproc import PatternGroup
from testkit.mount import Daemon, Mounts, read_attr, sh, write_attr

pytestmark = pytest.mark.live

_OK, _WHY = KernelKsm.available()
if not _OK:
    pytestmark = [pytest.mark.live, pytest.mark.skip(reason=_WHY)]

SYSFS = Path("/sys/kernel/mm/ksm")
N = 64  # pages per child: LTP's size * pages, three children


@pytest.fixture
def oracle_lock() -> Iterator[KernelKsm]:
    with KernelKsm() as k:
        yield k


def mount_ksm(mounts: Mounts, group: PatternGroup, *args: str, name: str = "ksm") -> Daemon:
    return mounts.start("--policy", "ksm", *(a for p in group.pids for a in ("--pid", str(p))), *args, name=name)


def echo(mp: Path, line: str) -> None:
    r = sh(line, cwd=mp)
    assert r.returncode == 0, f"{line}: {r.stderr}"


def wait_ksmd_full_scan(mp: Path) -> None:
    """LTP's wait_ksmd_full_scan(): full_scans up by 3 (two whole passes after this one)."""
    start = int(read_attr(mp, "full_scans"))
    wait_until(lambda: int(read_attr(mp, "full_scans")) >= start + 3, 60, what="three more full scans")


def final_group_check(mp: Path, run: int, shared: int, sharing: int, volatile: int, unshared: int,
                      sleep_ms: int, pages_to_scan: int) -> None:
    """LTP's final_group_check(): ksmd stopped (run=0) while the counters are read."""
    assert read_attr(mp, "run") == f"{run}\n"
    echo(mp, "echo 0 > run")
    got = {name: int(read_attr(mp, name)) for name in
           ("pages_shared", "pages_sharing", "pages_volatile", "pages_unshared", "sleep_millisecs", "pages_to_scan")}
    assert got == {"pages_shared": shared, "pages_sharing": sharing, "pages_volatile": volatile,
                   "pages_unshared": unshared, "sleep_millisecs": sleep_ms, "pages_to_scan": pages_to_scan}
    echo(mp, f"echo {run} > run")


def test_ltp_ksm01_phases_by_echo_and_cat(mounts: Mounts, oracle_lock: KernelKsm) -> None:
    """create_same_memory() of LTP's ksm_test.h, three children of N pages (all=3N):
    c/a/a -> (2, all-2), c/b/a -> (3, all-3), d/d/d -> (1, all-1), one page 'e' ->
    (1, all-2, volatile 0, unshared 1); run=2 unmerges everything, run=0 stops."""
    total = 3 * N
    phases = (
        ((((N, "c"),), ((N, "a"),), ((N, "a"),)), (2, total - 2, 0, 0)),
        ((((N, "c"),), ((N, "b"),), ((N, "a"),)), (3, total - 3, 0, 0)),
        ((((N, "d"),), ((N, "d"),), ((N, "d"),)), (1, total - 1, 0, 0)),
        ((((N, "d"),), ((N - 1, "d"), (1, "e")), ((N, "d"),)), (1, total - 2, 0, 1)),
    )
    with PatternGroup(phases[0][0], scope="madvise") as group:
        mp = mount_ksm(mounts, group).mountpoint
        # LTP's setup: smart_scan 0 and merge_across_nodes 1 (save_restore), then
        echo(mp, "echo 0 > smart_scan; echo 1 > merge_across_nodes")
        echo(mp, f"echo 2 > run; echo {total} > max_page_sharing")
        echo(mp, f"echo 1 > run; echo {total} > pages_to_scan; echo 0 > sleep_millisecs")
        for i, (specs, (shared, sharing, volatile, unshared)) in enumerate(phases):
            if i:
                group.rewrite(specs)
            wait_ksmd_full_scan(mp)
            final_group_check(mp, 1, shared, sharing, volatile, unshared, 0, total)
        echo(mp, "echo 2 > run")  # KSM unmerging
        final_group_check(mp, 2, 0, 0, 0, 0, 0, total)
        echo(mp, "echo 0 > run")
        final_group_check(mp, 0, 0, 0, 0, 0, 0, total)
        assert read_attr(mp, "full_scans") == "0\n"  # run=2 put the scan count back


# writes the kernel's stores refuse (EINVAL), the advisor's included
BAD_WRITES = (
    ("run", b"8\n"), ("run", b"3\n"), ("run", b"-1\n"), ("smart_scan", b"2\n"), ("smart_scan", b"maybe\n"),
    ("pages_to_scan", b"4294967296\n"), ("max_page_sharing", b"1\n"), ("use_zero_pages", b"x\n"),
    ("sleep_millisecs", b"-5\n"), ("stable_node_chains_prune_millisecs", b"1.5\n"),
    ("merge_across_nodes", b"2\n"), ("advisor_mode", b"Scan-time\n"), ("advisor_mode", b"scan-time\n\n"),
    ("advisor_mode", b" none\n"), ("advisor_mode", b"1\n"), ("advisor_max_cpu", b"-1\n"),
    ("advisor_max_cpu", b"18446744073709551616\n"), ("advisor_min_pages_to_scan", b"0x10\n"),
    ("advisor_max_pages_to_scan", b" 5\n"), ("advisor_target_scan_time", b"0\n"),
    ("advisor_target_scan_time", b"x\n"),
)


def test_mainline_files_as_the_kernel_lists_them(mounts: Mounts, oracle_lock: KernelKsm) -> None:
    """Every file of this kernel's /sys/kernel/mm/ksm (the advisor's too), with its
    mode; no LKSM file, no hint; the same errno as the kernel for every value its stores
    refuse, and nothing changed by them."""
    with PatternGroup((((4, "a"),),), scope="madvise") as group:
        mp = mount_ksm(mounts, group).mountpoint
        kernel = {p.name for p in SYSFS.iterdir()}
        ours = set(sh("ls", cwd=mp).stdout.split())
        assert ours == kernel | {"proc"}
        for name in kernel:
            assert (mp / name).stat().st_mode & 0o777 == (SYSFS / name).stat().st_mode & 0o777, name
        assert "hint" not in ours and "one_shot_scanning" not in ours and "region_share" not in ours
        assert read_attr(mp, "smart_scan") == "1\n"  # mainline's default
        before = {n: read_attr(mp, n) for n in kernel}
        for name, value in BAD_WRITES:
            want = write_attr(SYSFS, name, value)
            assert want == errno.EINVAL, (name, value)
            assert write_attr(mp, name, value) == want, (name, value)
        assert {n: read_attr(mp, n) for n in kernel} == before
        assert read_attr(mp, "run") == "0\n"
        assert write_attr(mp, "one_shot_scanning", b"1\n") == errno.ENOENT
        r = sh("echo 1 > smart_scan && echo 1 > run && cat run smart_scan", cwd=mp)
        assert r.returncode == 0 and r.stdout == "1\n1\n"
        wait_until(lambda: int(read_attr(mp, "full_scans")) >= 2, 60)
        assert int(read_attr(mp, "pages_sharing")) == 3 and int(read_attr(mp, "pages_shared")) == 1
        assert int(read_attr(mp, "pages_scanned")) >= 8


def test_node_exporter_ksmd_collector_on_the_mainline_mount(mounts: Mounts, oracle_lock: KernelKsm) -> None:
    node_exporter_binary()
    sysroot = mounts.root / "sys"
    (sysroot / "kernel" / "mm").mkdir(parents=True)
    with PatternGroup((((N, "a"),), ((N, "a"),)), scope="madvise") as group:
        d = mount_ksm(mounts, group, "--set", "run=1", "--set", "sleep_millisecs=0", name="sys/kernel/mm/ksm")
        mp = d.mountpoint
        wait_until(lambda: int(read_attr(mp, "pages_sharing")) == 2 * N - 1, 60)
        echo(mp, "echo 0 > run")  # still, while both read
        with node_exporter(mounts.root / "ne.log", "--collector.ksmd", f"--path.sysfs={sysroot}") as url:
            got = samples(scrape(url))
    assert value(got, "node_scrape_collector_success", collector="ksmd") == 1
    assert value(got, "node_ksmd_pages_sharing") == 2 * N - 1
    assert value(got, "node_ksmd_pages_shared") == 1
    for name in ("pages_unshared", "pages_volatile", "pages_to_scan", "merge_across_nodes"):
        assert value(got, f"node_ksmd_{name}") == int(read_attr(mp, name)), name
    assert value(got, "node_ksmd_full_scans_total") == int(read_attr(mp, "full_scans")) >= 2
    assert value(got, "node_ksmd_run") == 0
    assert value(got, "node_ksmd_sleep_seconds") == 0


def _advisor_steps(read: Callable[[str], int], start: Callable[[], None], scans: int,
                   timeout_s: float) -> list[tuple[int, int]]:
    """(full_scans, pages_to_scan) before `start()` and each time either changes after,
    until `scans` full scans.  The two files are read one after the other, so a pair is
    kept only when full_scans read the same before and after pages_to_scan: a wrap
    between the reads would pair the new value with the old count."""

    def pair() -> tuple[int, int]:
        while True:
            before, pts, after = read("full_scans"), read("pages_to_scan"), read("full_scans")
            if before == after:
                return before, pts

    seen = [pair()]
    start()

    def step() -> bool:
        now = pair()
        if now != seen[-1]:
            seen.append(now)
        return now[0] >= scans

    wait_until(step, timeout_s, interval=0.002, what=f"{scans} full scans")
    return seen


def _check_advisor_steps(who: str, steps: list[tuple[int, int]], max_pages: int) -> None:
    """What scan_time_advisor() guarantees whatever the CPU and the time: pages_to_scan
    changes only at a wrap (full_scans up, possibly read just after the retune), and each new value is at most
    advisor_max_pages_to_scan and at least min(10, that) - the result is
    min(max(.., cost * KSM_ADVISOR_MIN_CPU), max_pages) with cost = old / cpu_percent >= 1."""
    assert steps[0] == (0, 500), (who, steps)  # scan-time starts at advisor_min_pages_to_scan
    for i, ((scans0, pts0), (scans1, pts1)) in enumerate(zip(steps, steps[1:], strict=False)):
        if scans1 == scans0 and pts1 != pts0:
            # a wrap read half-way: the kernel retunes (advisor_stop_scan()) just before
            # it counts the scan (ksm_scan.seqnr++), lksmfs just before it publishes the
            # count - the next pair must then show that wrap, with no other change
            assert i + 2 < len(steps) and steps[i + 2] == (scans1 + 1, pts1), (who, steps)
        if pts1 != pts0 or scans1 != scans0:  # a retune, or a wrap: within the bounds
            assert min(10, max_pages) <= pts1 <= max_pages, (who, steps)


def test_the_advisor_retunes_pages_to_scan_as_the_kernels(mounts: Mounts, oracle_lock: KernelKsm) -> None:
    """The scan-time advisor on the kernel and on lksmfs, the same madvised children.

    Exact values cannot match: each new pages_to_scan is computed from the CPU the
    scanner used (ksmd's since it was switched on - for the first pass since boot -
    against lksmfs's scanner thread's), which differ.  What the rule guarantees does not
    depend on them, and is asserted on both: switching scan-time on starts at
    advisor_min_pages_to_scan (500) and refuses pages_to_scan writes (EINVAL);
    pages_to_scan moves only at a full scan's end; with advisor_max_pages_to_scan 50,
    below the start, every retune goes down into [10, 50] (the cap, over the CPU floor of
    10 pages per percent), whatever else the kernel's ksmd scans; advisor_mode none puts
    back 100 and scan-time again 500.  The hand-worked values of the arithmetic itself
    are tests/unit/test_advisor.py's."""
    k = oracle_lock
    with PatternGroup((((N, "a"),), ((N, "a"),), ((N, "b"),)), scope="madvise") as group:
        mp = mount_ksm(mounts, group).mountpoint
        runs: dict[str, list[tuple[int, int]]] = {}
        for who, write, read in (
            ("kernel", lambda n, v: k.write(n, v), k.read),
            ("lksmfs", lambda n, v: echo(mp, f"echo {v} > {n}"), lambda n: int(read_attr(mp, n))),
        ):
            write("run", 2)  # the cursor at the list head, full_scans 0
            write("sleep_millisecs", 0)  # passes back to back: foreign mms only slow them
            write("advisor_max_pages_to_scan", 50)
            write("advisor_mode", "scan-time")
            assert read("pages_to_scan") == 500, who
            root = SYSFS if who == "kernel" else mp
            assert write_attr(root, "pages_to_scan", b"100\n") == errno.EINVAL, who
            runs[who] = _advisor_steps(read, functools.partial(write, "run", 1), 3, 120)
            write("run", 0)
            _check_advisor_steps(who, runs[who], 50)
            assert runs[who][-1][1] <= 50 < 500, who  # down, as the cap says
            write("advisor_mode", "none")
            assert read("pages_to_scan") == 100, who
            write("advisor_mode", "scan-time")
            assert read("pages_to_scan") == 500, who
            write("advisor_mode", "none")
            write("advisor_max_pages_to_scan", 30000)
            write("run", 2)
