"""The LKSM sysfs ABI through a real FUSE mount, driven by real `sh`, `bash` and `cat`.

Each test mounts its own daemon (0.2 s) over a real child process, so no test sees
another's writes.  With run=0 the engine never scans, so every counter is 0 and every
tunable holds its SPEC §1 default; what a write does is then only what the rule says.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.memproc import MemProcess, filled
from testkit.mount import NOBODY, Mounts, mounted_at, read_attr, sh, write_attr

pytestmark = pytest.mark.live

# SPEC §1 defaults of the writable files
DEFAULTS = {
    "run": "0",
    "pages_to_scan": "100",
    "sleep_millisecs": "20",
    "scan_boost": "100",
    "full_scan_interval": "100",
    "one_shot_scanning": "0",
    "max_page_sharing": "256",
    "stable_node_chains_prune_millisecs": "2000",
    "use_zero_pages": "0",
    "merge_across_nodes": "1",
}
COUNTERS = [
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
    "stable_node_chains", "stable_node_dups", "scanning_process", "nr_regions",
    "pages_scanned", "general_profit", "ksm_zero_pages",
]
REGION_SHARE = "heap:0 stack:0 file_data:0 file_bss:0 conflicted:0"

# a value each writable file accepts, different from its default, and what it reads back
GOOD = {
    "pages_to_scan": ("1000", "1000"),
    "sleep_millisecs": ("0", "0"),
    "scan_boost": ("+2500", "2500"),
    "full_scan_interval": ("4294967295", "4294967295"),
    "max_page_sharing": ("2", "2"),
    "stable_node_chains_prune_millisecs": ("0", "0"),
    "use_zero_pages": ("on", "1"),
    "merge_across_nodes": ("0", "0"),
    "run": ("2", "2"),
    "one_shot_scanning": ("2", "2"),
}
# a value each writable file refuses (bash: "write error: Invalid argument")
BAD = {
    "pages_to_scan": "4294967296",
    "sleep_millisecs": "-1",
    "scan_boost": "99",
    "full_scan_interval": "1e3",
    "max_page_sharing": "1",
    "stable_node_chains_prune_millisecs": "ten",
    "use_zero_pages": "2",
    "merge_across_nodes": "2",
    "run": "9",
    "one_shot_scanning": "7",
}


def idle_mount(mounts: Mounts, child: MemProcess, *extra: str) -> Path:
    """A daemon that never scans (run=0) over the child."""
    return mounts.start("--pid", str(child.pid), "--set", "run=0", *extra).mountpoint


def test_listing_modes_and_owner(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child)
    names = set(os.listdir(mp))
    assert names == {*DEFAULTS, *COUNTERS, "region_share", "hint", "proc"}
    for name in DEFAULTS:
        st = os.stat(mp / name)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o644, 0, 0), name
    for name in [*COUNTERS, "region_share"]:
        assert os.stat(mp / name).st_mode & 0o777 == 0o444, name
    assert os.stat(mp / "hint").st_mode & 0o777 == 0o200
    assert os.stat(mp / "proc").st_mode & 0o777 == 0o555


def test_no_filter_has_no_region_files(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child, "--no-filter")
    names = set(os.listdir(mp))
    assert "region_share" not in names and "nr_regions" not in names
    assert "pages_sharing" in names


def test_every_file_reads_with_cat(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child)
    for name, value in DEFAULTS.items():
        r = sh(f"cat {name}", cwd=mp)
        assert (r.returncode, r.stdout, r.stderr) == (0, value + "\n", ""), name
    for name in COUNTERS:
        r = sh(f"cat {name}", cwd=mp)
        assert (r.returncode, r.stdout, r.stderr) == (0, "0\n", ""), name
    r = sh("cat region_share", cwd=mp)
    assert (r.returncode, r.stdout, r.stderr) == (0, REGION_SHARE + "\n", "")


def test_good_writes_read_back(mounts: Mounts, child: MemProcess) -> None:
    """Every writable file in turn; after each write exactly that file has changed."""
    mp = idle_mount(mounts, child)
    expected = dict(DEFAULTS)
    for name, (value, shown) in GOOD.items():
        r = sh(f"echo {value} > {name}", cwd=mp)
        assert (r.returncode, r.stderr) == (0, ""), name
        assert sh(f"cat {name}", cwd=mp).stdout == shown + "\n"
        expected[name] = shown
        assert {k: read_attr(mp, k).strip() for k in DEFAULTS} == expected, name


def test_bad_writes_fail_and_change_nothing(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child)
    for name, value in BAD.items():
        r = sh(f"echo {value} > {name}", cwd=mp, shell="bash")
        assert r.returncode == 1, name
        assert "write error: Invalid argument" in r.stderr, (name, r.stderr)
        r = sh(f"echo {value} > {name}", cwd=mp, shell="dash")
        assert r.returncode != 0 and "I/O error" in r.stderr  # dash's word for every errno
        assert write_attr(mp, name, value.encode() + b"\n") == errno.EINVAL, name
        assert {k: read_attr(mp, k).strip() for k in DEFAULTS} == DEFAULTS, name


def test_one_shot_7_is_invalid_and_pending_request_refuses_another(
    mounts: Mounts, child: MemProcess
) -> None:
    mp = idle_mount(mounts, child)  # run=0: nothing consumes a request
    r = sh("echo 7 > one_shot_scanning", cwd=mp, shell="bash")
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    assert read_attr(mp, "one_shot_scanning") == "0\n"
    assert sh("echo 1 > one_shot_scanning", cwd=mp).returncode == 0
    assert read_attr(mp, "one_shot_scanning") == "1\n"
    r = sh("echo 1 > one_shot_scanning", cwd=mp, shell="bash")
    assert r.returncode == 1 and "Invalid argument" in r.stderr  # "still scanning"
    r = sh("echo 2 > one_shot_scanning", cwd=mp, shell="bash")
    assert r.returncode == 1 and "Invalid argument" in r.stderr
    assert read_attr(mp, "one_shot_scanning") == "1\n"


def test_errnos_of_max_page_sharing_and_big_writes(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child)
    r = sh("echo 2147483648 > max_page_sharing", cwd=mp, shell="bash")
    assert r.returncode == 1 and "Numerical result out of range" in r.stderr  # kstrtoint
    # a longer write is cut to a page (4096 digits: too big for kstrtouint, EINVAL, as on
    # sysfs; test_fuse_sysfs_semantics compares more long writes with the kernel's)
    assert write_attr(mp, "pages_to_scan", b"1" * 4097) == errno.EINVAL
    assert write_attr(mp, "pages_to_scan", b"7" + b"\0" * 4095) == 0  # a page is fine
    assert read_attr(mp, "pages_to_scan") == "7\n"
    assert write_attr(mp, "pages_sharing", b"1") == errno.EACCES  # 0444: even root


def test_run_8_reads_back_8_and_scans(mounts: Mounts) -> None:
    """One-shot mode does the 3 initial full scans by itself.  The child holds 200
    identical pages: a group of n identical pages is 1 KSM page shared n-1 more times,
    so pages_sharing >= 199 and the child's merging_pages >= 200 (other equal pages of
    the interpreter may merge too: lower bounds)."""
    with filled(200) as c:
        mp = mounts.start("--pid", str(c.pid), "--set", "pages_to_scan=5000").mountpoint
        assert sh("echo 8 > run", cwd=mp).returncode == 0
        assert read_attr(mp, "run") == "8\n"
        wait_until(lambda: int(read_attr(mp, "full_scans")) >= 3, 30)
        assert int(read_attr(mp, "pages_sharing")) >= 199
        assert int(read_attr(mp, "pages_shared")) >= 1
        assert read_attr(mp, "scanning_process") == "1\n"
        assert read_attr(mp, "full_scan_interval") == "60000\n"  # set after the rounds
        assert os.listdir(mp / "proc") == [str(c.pid)]
        stat = sh(f"cat proc/{c.pid}/ksm_stat", cwd=mp)
        assert stat.returncode == 0
        fields = dict(line.split(" ", 1) for line in stat.stdout.splitlines())
        assert int(fields["ksm_merging_pages"]) >= 200
        merging = int(fields["ksm_merging_pages"])
        assert int(read_attr(mp, f"proc/{c.pid}/merging_pages")) == merging
        rmap = int(read_attr(mp, f"proc/{c.pid}/rmap_items"))
        assert rmap >= merging
        profit = read_attr(mp, f"proc/{c.pid}/ksm_process_profit")
        assert profit == fields["ksm_process_profit"] + "\n"
        assert fields["comm"] == "python3" or fields["comm"].startswith("python")
        # a full one-shot scan: accepted, pending, then back to 0 with one more full scan
        before = int(read_attr(mp, "full_scans"))
        assert sh("echo 2 > one_shot_scanning", cwd=mp).returncode == 0
        wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", 30)
        assert int(read_attr(mp, "full_scans")) == before + 1


def test_hint_file(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid), "--set", "run=0")
    mp = d.mountpoint
    assert sh(f"echo '{child.pid} frozen' > hint", cwd=mp).returncode == 0
    assert sh(f"echo '{child.pid} thawed' > hint", cwd=mp).returncode == 0
    for bad in ("frozen", f"{child.pid}", f"{child.pid} cold", f"x{child.pid} frozen",
                f"{child.pid}  frozen", f"-{child.pid} frozen"):
        r = sh(f"echo '{bad}' > hint", cwd=mp, shell="bash")
        assert r.returncode == 1 and "Invalid argument" in r.stderr, bad
    r = sh("echo '4194304 frozen' > hint", cwd=mp, shell="bash")  # pid_max: nobody there
    assert r.returncode == 1 and "No such process" in r.stderr
    r = sh("cat hint", cwd=mp)
    assert r.returncode == 1 and "Permission denied" in r.stderr
    assert f"hint: {child.pid}@" in d.log()  # the accepted hints were logged
    assert d.proc.poll() is None


def test_nobody_reads_but_cannot_write(mounts: Mounts, child: MemProcess) -> None:
    mp = idle_mount(mounts, child)
    r = sh("cat run pages_sharing region_share", cwd=mp, user=NOBODY)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"0\n0\n{REGION_SHARE}\n", "")
    for name in ("run", "one_shot_scanning", "pages_to_scan", "hint"):
        r = sh(f"echo 1 > {name}", cwd=mp, user=NOBODY)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (name, r)
    r = sh("echo 1 > pages_sharing", cwd=mp, user=NOBODY)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert read_attr(mp, "run") == "0\n" and read_attr(mp, "one_shot_scanning") == "0\n"
    assert read_attr(mp, "pages_to_scan") == "100\n"


def test_second_daemon_on_a_live_mount_is_refused(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid))
    second = mounts.start("--pid", str(child.pid), wait=False)
    assert second.proc.wait(20) == 1
    assert "already mounted" in second.log()
    assert d.proc.poll() is None and read_attr(d.mountpoint, "run") == "0\n"


def test_bad_set_fails_before_mounting(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid), "--set", "scan_boost=5", wait=False)
    assert d.proc.wait(20) == 2
    assert "--set scan_boost=5: must be 100..10000 (got 5)" in d.log()
    assert not mounted_at(d.mountpoint)


def test_region_share_format_after_scan(mounts: Mounts) -> None:
    with filled(50) as c:
        mp = mounts.start("--pid", str(c.pid), "--set", "run=1").mountpoint
        wait_until(lambda: int(read_attr(mp, "full_scans")) >= 1, 30)
        text = read_attr(mp, "region_share")
        assert re.fullmatch(
            r"heap:\d+ stack:0 file_data:\d+ file_bss:\d+ conflicted:\d+\n", text
        ), text
