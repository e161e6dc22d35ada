"""Results that explain themselves (issue 11, part 2), through the real `lksmfs` command:
what was left out of a scan and why, with the exit status; the mount's warnings and its
refusal without privilege; what the daemon says while it works (log, systemd STATUS,
thread names); progress on a terminal and Ctrl-C; --version, help and --set names.
Messages are asserted by content, exit statuses exactly.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

import lksmfs
from lksmfs.system.proc import PAGE_SIZE, try_stat
from lksmfs.system.waiting import wait_until
from testkit import REPO
from testkit.memproc import MemProcess, filled
from testkit.mount import NOBODY, Mounts, mounted_at, public_tmpdir, read_attr, skip_unless_fuse
from testkit.patterns import Region

pytestmark = pytest.mark.live

LKSMFS = [sys.executable, "-m", "lksmfs.cli"]
NOTHING = "lksmfs scan: nothing in scope could be scanned: see above\n"
SHORT = re.compile(r"short task: (\d+) ms of CPU time, less than the 100 ms LKSM requires "
                   r"\(check_short_task\); --include-short-tasks scans it")


def lksmfs_cmd(*args: str, user: list[str] | None = None, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(user or []), *LKSMFS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def short_task() -> Iterator[int]:
    """A live `sleep`: a process with almost no CPU time (LKSM's short task)."""
    p = subprocess.Popen(["sleep", "600"])
    try:
        wait_until(lambda: (st := try_stat(p.pid)) is not None and st.comm == "sleep", 10)
        yield p.pid
    finally:
        p.kill()
        p.wait(10)


def open_files(pid: int) -> set[str]:
    """What the fds of process `pid` point to (fds closed meanwhile left out)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def no_such_pid() -> int:
    """A pid no process can have: one above the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


# -- lksmfs scan: what was left out, and why -----------------------------------------------


def test_scan_of_a_short_task_says_so_and_fails(short_task: int) -> None:
    r = lksmfs_cmd("scan", "--pid", str(short_task))
    assert r.returncode == 1 and r.stdout == ""
    first, second = r.stderr.splitlines(keepends=True)
    assert first.startswith(f"lksmfs scan: left out pid {short_task} (sleep): short task: ")
    m = SHORT.search(first)
    assert m is not None and int(m[1]) < 100, first
    assert second == NOTHING
    j = lksmfs_cmd("scan", "--pid", str(short_task), "--json")
    assert j.returncode == 1
    out = json.loads(j.stdout)
    assert out["scanned_processes"] == 0
    [skipped] = out["skipped"]
    assert (skipped["pid"], skipped["comm"], skipped["reason"]) == (short_task, "sleep", "short_task")
    assert skipped["cpu_ms"] < 100 and SHORT.search(skipped["message"])


def test_include_short_tasks_overrides_the_rule(short_task: int) -> None:
    r = lksmfs_cmd("scan", "--pid", str(short_task), "--include-short-tasks", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["scanned_processes"], out["skipped"], out["scanning_process"]) == (1, [], 1)
    assert r.stderr == ""


def test_scan_of_a_missing_pid_and_cgroup_says_so_and_fails() -> None:
    pid, cg = no_such_pid(), f"/sys/fs/cgroup/lksmfs-no-such-{uuid.uuid4().hex[:8]}"
    r = lksmfs_cmd("scan", "--pid", str(pid), "--cgroup", cg)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"lksmfs scan: left out pid {pid}: no such process\n"
                        f"lksmfs scan: left out cgroup {cg}: no such cgroup directory\n" + NOTHING)
    out = json.loads(lksmfs_cmd("scan", "--pid", str(pid), "--cgroup", cg, "--json").stdout)
    assert out["skipped"] == [
        {"pid": pid, "comm": None, "reason": "no_such_process", "message": "no such process"},
        {"pid": None, "comm": None, "reason": "no_such_cgroup", "message": "no such cgroup directory", "cgroup": cg},
    ]


def test_scan_without_privilege_says_what_is_needed() -> None:
    """A real unprivileged user (nobody) and root's process: /proc refuses its maps."""
    with filled(16) as c:
        r = lksmfs_cmd("scan", "--pid", str(c.pid), user=NOBODY)
        assert (r.returncode, r.stdout) == (1, "")
        comm = try_stat(c.pid).comm  # type: ignore[union-attr]
        assert r.stderr == (
            f"lksmfs scan: left out pid {c.pid} ({comm}): permission denied reading its memory (uid 65534 "
            "without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH): needs root or CAP_SYS_PTRACE\n" + NOTHING)
        j = lksmfs_cmd("scan", "--pid", str(c.pid), "--json", user=NOBODY)
        assert j.returncode == 1
        assert [(s["pid"], s["reason"]) for s in json.loads(j.stdout)["skipped"]] == [(c.pid, "permission_denied")]


def test_scan_with_part_of_the_scope_missing_succeeds_and_lists_the_rest() -> None:
    pid = no_such_pid()
    with filled(16) as c:
        r = lksmfs_cmd("scan", "--pid", str(c.pid), "--pid", str(pid))
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"lksmfs scan: left out pid {pid}: no such process\n"
    lines = r.stdout.splitlines()
    assert [ln[:28] for ln in lines[:3]] == [f"{i}/3 full scan: 1 processes, " for i in (1, 2, 3)]
    assert "processes: 1 scanned, 1 left out; wall " in lines[-1]


def test_scan_summary_counts_zero_pages_when_use_zero_pages_is_on() -> None:
    """4096 written-zero pages (16 MiB): with use_zero_pages they are merged with the zero
    page, not into KSM pages, so pages_sharing alone would say ~0 MiB saved."""
    with MemProcess(Region("zeros", [(4096, "zero")]), cpu_ms=150) as c:
        r = lksmfs_cmd("scan", "--pid", str(c.pid), "--set", "use_zero_pages=1")
        j = json.loads(lksmfs_cmd("scan", "--pid", str(c.pid), "--set", "use_zero_pages=1", "--json").stdout)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^pages_shared (\d+)  pages_sharing (\d+)  ksm_zero_pages (\d+) \(([\d.]+) MiB saved\)$",
                  r.stdout, re.M)
    assert m is not None, r.stdout
    sharing, zero, saved = int(m[2]), int(m[3]), float(m[4])
    assert zero >= 4096  # every page of the region (the interpreter may have more)
    assert saved == round((sharing + zero) * PAGE_SIZE / 2**20, 1) and saved >= 16.0
    g = re.search(r"^general_profit (-?\d+) bytes \((-?[\d.]+) MiB: the pages saved less 64 bytes per rmap item\)$",
                  r.stdout, re.M)
    assert g is not None, r.stdout
    profit = int(g[1])  # (pages_sharing + ksm_zero_pages) * 4096 - rmap_items * 64, as mainline
    assert profit <= (sharing + zero) * PAGE_SIZE and float(g[2]) == round(profit / 2**20, 1) >= 15.0
    # the same names in --json
    assert j["ksm_zero_pages"] >= 4096 and j["general_profit"] >= 15 * 2**20


def _thp_mode() -> str:
    """The host's transparent_hugepage/enabled choice (never, madvise or always)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    m = re.search(r"\[(\w+)\]", text)
    return m[1] if m else "never"


def test_scan_counts_the_pages_in_transparent_huge_pages() -> None:
    """A region the kernel backs with huge pages (8 MiB, madvise(MADV_HUGEPAGE)): the scan
    counts its pages in huge pages - smaps' AnonHugePages, read here by the test itself -
    in --json and in the text summary."""
    if _thp_mode() == "never":
        pytest.skip("transparent huge pages are disabled on this host")
    with MemProcess(Region("heap", [(2048, "a")], hugepage=True), cpu_ms=150, thp=True) as c:
        smaps = Path(f"/proc/{c.pid}/smaps").read_text()
        huge_kb = sum(int(line.split()[1]) for line in smaps.splitlines() if line.startswith("AnonHugePages:"))
        if huge_kb == 0:
            pytest.skip("the kernel backed the region with no huge page (fragmented memory?)")
        j = json.loads(lksmfs_cmd("scan", "--pid", str(c.pid), "--json").stdout)
        r = lksmfs_cmd("scan", "--pid", str(c.pid))
    assert r.returncode == 0, r.stderr
    assert j["thp_pages"] == huge_kb * 1024 // PAGE_SIZE
    assert re.search(rf"^thp_pages {j['thp_pages']}  \(in transparent huge pages", r.stdout, re.M), r.stdout


# -- lksmfs scan on a terminal: progress and Ctrl-C -------------------------------------------


# 128 MiB of distinct pages, then a busy loop: a task that runs between two scans is read
# again every round (a quiet one would not be: MemorySource.cpu_mark), so each round costs
# about 0.1 s on the development VM whatever the scanner learns to skip.
BUSY_BIG = ("import os, sys; m = bytearray(os.urandom(128 << 20)); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush()\nwhile True: pass")


@pytest.fixture
def big() -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-S", "-c", BUSY_BIG], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        yield p
    finally:
        p.kill()
        p.wait(10)


def test_scan_shows_progress_on_a_terminal_only(big: subprocess.Popen[str]) -> None:
    """40 rounds of a running task take more than a second: stderr, a terminal, gets a status line redrawn
    in place and erased at the end; the result on stdout is the same as without one."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([*LKSMFS, "scan", "--pid", str(big.pid), "--rounds", "40", "--no-filter"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=False)
        os.close(slave)
        tty = b""
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, "no output from the scan within 120 s"
            try:
                chunk = os.read(master, 65536)
            except OSError as e:  # EIO: the last writer closed the terminal
                assert e.errno == errno.EIO
                break
            if not chunk:
                break
            tty += chunk
        stdout = p.stdout.read() if p.stdout else b""
        assert p.wait(60) == 0
    finally:
        os.close(master)
    assert re.search(rb"\r\x1b\[Kscanning: round \d+/40, process 1/1, \d+ pages, \d+ s", tty), tty[:500]
    assert tty.endswith(b"\r\x1b[K")  # erased: the terminal is left clean
    assert stdout.startswith(b"1/40 full scan: 1 processes, ")
    r = lksmfs_cmd("scan", "--pid", str(big.pid), "--rounds", "40", "--no-filter")  # stderr: a pipe
    assert (r.returncode, r.stderr) == (0, "")


def test_ctrl_c_ends_a_scan_with_one_line(big: subprocess.Popen[str]) -> None:
    """A real SIGINT to a real `lksmfs scan` in the middle of its scans."""
    p = subprocess.Popen([*LKSMFS, "scan", "--pid", str(big.pid), "--rounds", "100000"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mem = f"/proc/{big.pid}/mem"  # open while the scan reads the child's pages
        wait_until(lambda: p.poll() is not None or mem in open_files(p.pid), 60, what="the scan to read memory")
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 130
    assert out == ""
    assert re.fullmatch(r"lksmfs scan: interrupted after [\d.]+ s: no result\n", err), err


# -- the command line ---------------------------------------------------------------------


def test_version() -> None:
    r = lksmfs_cmd("--version")
    assert (r.returncode, r.stdout) == (0, f"lksmfs {lksmfs.__version__}\n")
    assert version("lksmfs") == lksmfs.__version__  # the installed metadata says the same


@pytest.mark.parametrize("command", [["simulate"], ["scan"], ["mount"], ["workload"], ["workload", "spawn"],
                                     ["share"], []])
def test_help_has_a_description_and_examples(command: list[str]) -> None:
    r = lksmfs_cmd(*command, "--help")
    assert r.returncode == 0, r.stderr
    usage, description = r.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: lksmfs {' '.join(command)}".rstrip())
    assert len(description.split()) >= 8, description  # a sentence, not a bare option list
    examples = r.stdout.split("examples:\n", 1)[1]
    assert examples.startswith("  lksmfs "), examples


@pytest.mark.parametrize("command", ["scan", "mount"])
def test_set_with_a_wrong_name_lists_the_valid_ones(command: str) -> None:
    args = ["/tmp/lksmfs-never-mounted"] if command == "mount" else []
    r = lksmfs_cmd(command, *args, "--set", "pages_to_scna=5")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"lksmfs {command}: --set pages_to_scna=5: unknown attribute (writable ones: "
                        "full_scan_interval, max_page_sharing, merge_across_nodes, one_shot_scanning, "
                        "pages_to_scan, run, scan_boost, sleep_millisecs, stable_node_chains_prune_millisecs, "
                        "use_zero_pages)\n")


# -- lksmfs mount -----------------------------------------------------------------------------


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    skip_unless_fuse()
    with Mounts() as m:
        yield m


def test_mount_warns_about_a_missing_pid_and_cgroup(mounts: Mounts) -> None:
    pid, cg = no_such_pid(), f"/sys/fs/cgroup/lksmfs-no-such-{uuid.uuid4().hex[:8]}"
    d = mounts.start("--pid", str(pid), "--cgroup", cg, "--no-freezer")
    log = d.log()
    assert f"WARNING lksmfs.daemon[MainThread]: scope: pid {pid}: no such process\n" in log
    assert (f"WARNING lksmfs.daemon[MainThread]: scope: cgroup {cg}: no such cgroup directory (its processes "
            "are scanned once it has some)\n") in log
    assert ("WARNING lksmfs.daemon[MainThread]: scope: nothing in --pid/--cgroup can be scanned now: nothing "
            "will be until it can\n") in log
    assert read_attr(d.mountpoint, "run") == "0\n"  # it serves anyway: a cgroup may appear later
    assert d.terminate() == 0


def test_mount_without_root_says_what_is_needed() -> None:
    """Not libfuse's "failed to open /dev/fuse" followed by a false "unmounted, stopping"."""
    skip_unless_fuse()
    with public_tmpdir() as tmp:
        mp = tmp / "ksm"
        r = lksmfs_cmd("mount", str(mp), user=NOBODY, timeout=60)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == (
            "lksmfs mount: needs root: running as uid 65534 without CAP_SYS_ADMIN. Mounting needs CAP_SYS_ADMIN, "
            "reading other processes' memory CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: run it as root, or with the "
            "capabilities systemd/lksmfs.service grants (CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH)\n")
        assert not mounted_at(mp)
    unit = (REPO / "systemd" / "lksmfs.service").read_text()
    assert "AmbientCapabilities=CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH" in unit  # the words above


SCAN_LINE = re.compile(r"INFO lksmfs\.daemon\[scanner\]: full scan: 1 processes, (\d+) pages scanned, (\d+) merged, "
                       r"(\d+) broken; pages_sharing (\d+) \(([\d.]+) MiB saved\); [\d.]+ s\n")


def test_daemon_logs_each_scan_and_tells_systemd(mounts: Mounts, child: MemProcess) -> None:
    """One INFO line per completed scan, its figures those of the files; STATUS= carries
    the same words to `systemctl status`."""
    name = f"lksmfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(30)
        d = mounts.start("--pid", str(child.pid), "--set", "run=8", "--set", "pages_to_scan=5000",
                         env={"NOTIFY_SOCKET": "@" + name})
        statuses: list[str] = []
        while len(statuses) < 3:
            msg = s.recv(4096).decode()
            if msg.startswith("STATUS=last "):
                statuses.append(msg)
    wait_until(lambda: len(SCAN_LINE.findall(d.log())) == 3, 30, what="3 scan lines in the log")
    scans = SCAN_LINE.findall(d.log())
    assert sum(int(sc[0]) for sc in scans) == int(read_attr(d.mountpoint, "pages_scanned"))
    sharing = int(read_attr(d.mountpoint, "pages_sharing"))
    assert int(scans[-1][3]) == sharing and float(scans[-1][4]) == round(sharing * PAGE_SIZE / 2**20, 1)
    assert sharing >= 63  # the child's 64 equal pages at least
    assert re.fullmatch(rf"STATUS=last full scan: 1 processes, \d+ pages scanned, \d+ merged, \d+ broken; "
                        rf"pages_sharing {sharing} \([\d.]+ MiB saved\); [\d.]+ s \(at \d\d:\d\d:\d\d\)", statuses[-1])


def test_threads_are_named_in_the_log_and_in_ps(mounts: Mounts, child: MemProcess) -> None:
    d = mounts.start("--pid", str(child.pid), "--set", "run=8",
                     "--metrics-textfile", str(mounts.root / "lksm.prom"))
    wait_until(lambda: read_attr(d.mountpoint, "full_scans") == "3\n", 30)
    comms = [Path(t, "comm").read_text().strip() for t in Path(f"/proc/{d.proc.pid}/task").iterdir()]
    assert {"crawler", "scanner", "freezer", "metrics", "sigquit", "fuse"} <= set(comms), comms
    ps = subprocess.run(["ps", "-L", "-o", "comm=", "-p", str(d.proc.pid)], capture_output=True, text=True)
    assert {"crawler", "scanner", "freezer", "fuse"} <= set(ps.stdout.split())
    log = d.log()
    assert "[fuse]: mounted at " in log and "[scanner]: full scan: " in log and "[MainThread]: freezer: " in log
    assert "Dummy-" not in log and "lksm-" not in log
