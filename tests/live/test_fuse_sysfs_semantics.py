"""The mount against the kernel's own sysfs: the same real commands in the lksmfs mount
and in /sys/kernel/mm/ksm must give the same exit status and the same message.

Only operations that change nothing in the kernel's KSM are run on /sys (a chmod to the
mode a file already has, a chown to root, a touch, refused namespace changes, writes to
stable_node_chains_prune_millisecs that are put back).  What would change the real
files (chmod 600, chown nobody) is checked on the mount alone, against the rules
measured once on /sys (lksmfs/sysfs/nodes.py)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.memproc import MemProcess, filled
from testkit.mount import NOBODY, Mounts, read_attr, sh
from testkit.readable import readable_install

pytestmark = pytest.mark.live

SYSFS = Path("/sys/kernel/mm/ksm")
STRANGER = ["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups"]  # no such user: owns nothing

# Each command in turn, in a bash whose cwd is the directory under test; the directory's
# path is replaced by DIR in the messages.  Nothing here changes a value or a mode.
COMMANDS = [
    "chmod 644 pages_to_scan",
    "chmod 444 full_scans",
    "chown root:root pages_to_scan",
    "chown 0 full_scans",
    "touch pages_to_scan",
    "touch -c full_scans",
    "touch newfile",
    "echo 1 > newfile",
    "mv pages_to_scan renamed",
    "mv full_scans pages_sharing",
    "rm pages_to_scan",
    "rm -f full_scans",
    "mkdir newdir",
    "rmdir full_scans",
    "rmdir .",
    "ln -s pages_to_scan link",
    "ln pages_to_scan hardlink",
    "mknod fifo p",
    "truncate -s 0 pages_to_scan",
    "truncate -s 0 full_scans",
    "echo 1 > full_scans",
    "exec 3<> full_scans",
    "set -C; echo 1 > pages_to_scan",
]

# write(2) payloads, each as one call, to stable_node_chains_prune_millisecs
# (kstrtouint on both sides; the kernel's value matters to nobody here)
LONG_WRITES = [
    b"101" + b" " * 5000,  # the first page has to parse: EINVAL
    b"102\n" + b"\0" * 5000,  # 4096 of 5004 bytes taken, 102 stored
    b"103\n" + b"\0" * 4092,  # exactly a page
    b"104\n" + b"\0" * 4093,  # a page and one byte
    b"0" * 4093 + b"105" + b"junk",  # the page ends before the junk: 105
    b"106\n" + b"x" * 5000,  # the junk is in the first page: EINVAL
    b"107\n" + b"\0" * 200000,
]
PRUNE = "stable_node_chains_prune_millisecs"


def _run_all(directory: Path, commands: list[str], user: list[str] | None = None) -> list[str]:
    out = []
    for cmd in commands:
        r = sh(cmd, cwd=directory, shell="bash", user=user)
        message = (r.stdout + r.stderr).replace(str(directory), "DIR").replace("bash: line 1: ", "")
        out.append(f"{cmd}: rc={r.returncode} {message.strip()}".rstrip())
    return out


def _write_once(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        return f"wrote {os.write(fd, data)}"
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    finally:
        os.close(fd)


@pytest.fixture
def sysfs_ksm() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("comparing with sysfs needs root")
    if not (SYSFS / PRUNE).exists():
        pytest.skip(f"no {SYSFS} with {PRUNE} on this kernel")
    before = {PRUNE: (SYSFS / PRUNE).read_text()}  # other values may be other tests' to change
    modes = {p.name: p.stat().st_mode for p in SYSFS.iterdir()}
    try:
        yield SYSFS
    finally:
        with contextlib.suppress(OSError):
            (SYSFS / PRUNE).write_text(before[PRUNE])
        assert {name: (SYSFS / name).read_text() for name in before} == before
        assert {p.name: p.stat().st_mode for p in SYSFS.iterdir()} == modes


def test_metadata_and_namespace_operations_answer_as_sysfs(
    mounts: Mounts, child: MemProcess, sysfs_ksm: Path
) -> None:
    mp = mounts.start("--pid", str(child.pid), "--set", "run=0").mountpoint
    ours = _run_all(mp, COMMANDS)
    kernel = _run_all(sysfs_ksm, COMMANDS)
    assert ours == kernel
    # what these answers are (read on 6.18), so a change on either side shows here too
    assert "chmod 644 pages_to_scan: rc=0" in ours
    assert "touch newfile: rc=1 touch: cannot touch 'newfile': Permission denied" in ours
    assert "mkdir newdir: rc=1 mkdir: cannot create directory ‘newdir’: Operation not permitted" in ours
    assert "rm pages_to_scan: rc=1 rm: cannot remove 'pages_to_scan': Operation not permitted" in ours
    assert "echo 1 > full_scans: rc=1 full_scans: Permission denied" in ours
    assert set(os.listdir(mp)) >= {"pages_to_scan", "full_scans"} and "newfile" not in os.listdir(mp)
    assert read_attr(mp, "pages_to_scan") == "100\n"


def test_a_stranger_gets_the_same_refusals(mounts: Mounts, child: MemProcess, sysfs_ksm: Path) -> None:
    """Non-root: the kernel decides before either file system is asked, on both."""
    mp = mounts.start("--pid", str(child.pid), "--set", "run=0").mountpoint
    commands = ["chmod 644 pages_to_scan", "chown 12345 full_scans", "touch pages_to_scan",
                "touch newfile", "rm -f full_scans", "mkdir d", "mv run x", "echo 5 > pages_to_scan",
                "cat pages_to_scan >/dev/null"]  # the kernel's value is other tests' business
    ours = _run_all(mp, commands, user=STRANGER)
    assert ours == _run_all(sysfs_ksm, commands, user=STRANGER)
    assert ours[0] == ("chmod 644 pages_to_scan: rc=1 chmod: changing permissions of 'pages_to_scan': "
                       "Operation not permitted")
    assert ours[-1] == "cat pages_to_scan >/dev/null: rc=0"


def test_writes_longer_than_a_page_as_sysfs(mounts: Mounts, child: MemProcess, sysfs_ksm: Path) -> None:
    mp = mounts.start("--pid", str(child.pid), "--set", "run=0").mountpoint

    def results(directory: Path) -> list[str]:
        return [f"{_write_once(directory / PRUNE, data)} -> {(directory / PRUNE).read_text().strip()}"
                for data in LONG_WRITES]

    ours = results(mp)
    assert ours == results(sysfs_ksm)
    assert ours == ["EINVAL -> 2000", "wrote 4096 -> 102", "wrote 4096 -> 103", "wrote 4096 -> 104",
                    "wrote 4096 -> 105", "EINVAL -> 105", "wrote 4096 -> 107"]
    # dd writes the rest after a short write: the rest (NULs only) is a second store, EINVAL
    payload = mp.parent / "payload"
    payload.write_bytes(b"108\n" + b"\0" * 5000)
    dd = [sh(f"dd if={payload} of={d / PRUNE} bs=8192 status=none", shell="bash") for d in (mp, sysfs_ksm)]
    assert [(r.returncode, r.stderr.replace(str(d), "DIR")) for r, d in zip(dd, (mp, sysfs_ksm), strict=True)] \
        == [(1, "dd: error writing 'DIR/stable_node_chains_prune_millisecs': Invalid argument\n")] * 2
    assert read_attr(mp, PRUNE) == (sysfs_ksm / PRUNE).read_text() == "108\n"


def test_chmod_chown_touch_last_and_open_follows_the_mode(mounts: Mounts, child: MemProcess) -> None:
    """kernfs keeps them, and checks the current mode at open, for root too."""
    mp = mounts.start("--pid", str(child.pid), "--set", "run=0").mountpoint
    assert sh("chmod 600 run && stat -c %a run", cwd=mp).stdout == "600\n"
    r = sh("cat run", cwd=mp, user=NOBODY)
    assert (r.returncode, r.stderr) == (1, "cat: run: Permission denied\n")
    assert sh("chmod 000 pages_to_scan", cwd=mp).returncode == 0
    r = sh("cat pages_to_scan", cwd=mp)  # root, but the mode says nobody
    assert (r.returncode, r.stderr) == (1, "cat: pages_to_scan: Permission denied\n")
    assert sh("chmod 644 pages_to_scan && chown nobody:nogroup pages_to_scan", cwd=mp).returncode == 0
    r = sh("echo 321 > pages_to_scan", cwd=mp, user=NOBODY)  # the new owner may write
    assert (r.returncode, r.stderr) == (0, "")
    assert read_attr(mp, "pages_to_scan") == "321\n"
    assert sh("stat -c '%U:%G %a' pages_to_scan", cwd=mp).stdout == "nobody:nogroup 644\n"
    assert sh("touch -d @1000000000 run && stat -c %Y run", cwd=mp).stdout == "1000000000\n"
    assert sh("stat -c '%U %a' full_scans", cwd=mp).stdout == "root 444\n"  # the others unchanged


@pytest.fixture
def nobody_child() -> Iterator[MemProcess]:
    """A process of nobody's with 32 identical pages (not the root child's byte value),
    its program copied where nobody may read it (the checkout may be where only root can
    go)."""
    with readable_install() as inst, filled(32, 0xA7, user=NOBODY, python=inst.python[0], child=inst.memchild) as c:
        yield c


def test_per_process_files_belong_to_the_process_owner(
    mounts: Mounts, child: MemProcess, nobody_child: MemProcess
) -> None:
    mp = mounts.start("--pid", str(child.pid), "--pid", str(nobody_child.pid), "--set", "run=8",
                      "--set", "pages_to_scan=5000").mountpoint
    mine, roots = mp / "proc" / str(nobody_child.pid), mp / "proc" / str(child.pid)
    wait_until(lambda: int(read_attr(mp, "full_scans")) >= 3, 30)
    # the kernel's /proc/PID/ksm_stat of the same process: same mode, same owner
    for ours, kernel in ((mine / "ksm_stat", Path(f"/proc/{nobody_child.pid}/ksm_stat")),
                         (roots / "ksm_stat", Path(f"/proc/{child.pid}/ksm_stat"))):
        a, b = ours.stat(), kernel.stat()
        assert (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid), ours
    assert sh(f"stat -c '%a %U:%G' {mine} {mine}/ksm_stat", shell="bash").stdout == \
        "555 nobody:nogroup\n400 nobody:nogroup\n"
    # its owner reads it: its 32 identical pages are merged (equal pages of the
    # interpreter may merge too: a lower bound)
    r = sh(f"cat {mine}/merging_pages", user=NOBODY)
    assert (r.returncode, r.stderr) == (0, "") and int(r.stdout) >= 32
    # another user may list the directory but not read the figures
    r = sh(f"ls {mine} && cat {mine}/merging_pages", user=STRANGER, shell="bash")
    assert r.returncode == 1 and r.stdout.split() == ["ksm_process_profit", "ksm_stat", "merging_pages",
                                                       "rmap_items"]
    assert r.stderr == f"cat: {mine}/merging_pages: Permission denied\n"
    # nor may nobody read root's process's figures, which root reads
    r = sh(f"cat {roots}/merging_pages", user=NOBODY)
    assert (r.returncode, r.stderr) == (1, f"cat: {roots}/merging_pages: Permission denied\n")
    assert int(read_attr(roots, "merging_pages")) >= child.npages("data")
    r = sh(f"chmod 444 {mine}/ksm_stat")
    assert (r.returncode, r.stderr) == (1, f"chmod: changing permissions of '{mine}/ksm_stat': "
                                            "Operation not permitted\n")
