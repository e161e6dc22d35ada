"""Freezer hints on a cgroup2-only host (issue 11, part 1), on a cgroup2-only view of this
hybrid machine (testkit.cgroup2_only: a private mount namespace with cgroup2 at
/sys/fs/cgroup and no v1 freezer).  The real daemon, `lksmfs workload spawn` and
`make run` run inside it with no freezer configuration: each finds the hierarchy in
/proc/self/mountinfo and says so, and a process frozen through cgroup.freeze there
reaches the engine as a frozen hint.  Nothing leaks out of the namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lksmfs.system import cgroups
from lksmfs.system.mounts import read_mountinfo
from lksmfs.system.waiting import wait_until
from testkit import REPO
from testkit import cgroup2_only as view
from testkit.memproc import MemProcess, filled
from testkit.mount import Mounts, mounted_at, public_tmpdir, skip_unless_fuse

pytestmark = pytest.mark.live

FOUND = "freezer: watching cgroup2 at /sys/fs/cgroup (found in /proc/self/mountinfo)"
CgroupFactory = Callable[[], str]


@pytest.fixture(autouse=True)
def _needs_the_view() -> Iterator[None]:
    why = view.unavailable()
    if why is not None:
        pytest.skip(why)
    before = _cgroup_mounts()
    yield
    assert _cgroup_mounts() == before, "a mount leaked out of the cgroup2-only view"


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """What this namespace has mounted at /sys/fs/cgroup and below."""
    return [(m.mountpoint, m.fstype, m.device) for m in read_mountinfo()
            if m.mountpoint == "/sys/fs/cgroup" or m.mountpoint.startswith("/sys/fs/cgroup/")]


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def test_view_has_only_cgroup2_at_sys_fs_cgroup() -> None:
    """The view itself: mountinfo lists the covered hierarchies too, and discovery keeps
    only what can be reached."""
    code = "from lksmfs.system.cgroups import discover, default_hierarchy; print(discover(), default_hierarchy())"
    r = subprocess.run(view.command([sys.executable, "-c", code]), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "([], ['/sys/fs/cgroup']) ('/sys/fs/cgroup', True)\n"


def test_daemon_finds_cgroup2_and_a_cgroup_freeze_reaches_the_engine(v2_cgroup: CgroupFactory) -> None:
    """The daemon, scoped to one process P: after its initial full scans a partial
    request scans nobody (P is known and idle: neither newcomer nor VIP); once P's group
    is frozen through cgroup.freeze in the view, the hint is logged and the next partial
    request scans P - the frozen hint is what put it in the scan."""
    skip_unless_fuse()
    group = v2_cgroup()
    with public_tmpdir() as tmp, filled(64) as p:
        cgroups.attach(group, p.pid)
        mp, log_path = tmp / "ksm", tmp / "daemon.log"
        mp.mkdir()
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                view.command([sys.executable, "-m", "lksmfs.cli", "mount", str(mp), "--pid", str(p.pid),
                              "--set", "run=8", "--set", "pages_to_scan=5000", "--log-level", "INFO"]),
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        inside = view.Inside(daemon.pid)
        try:
            _hint_reaches_the_engine(daemon, inside, mp, log_path, p, view.view_group(group))
        finally:
            cgroups.thaw_quietly(group)
            assert _stop(daemon) == 0, log_path.read_text()
        assert not mounted_at(mp)  # the mount was never visible here


def _hint_reaches_the_engine(daemon: subprocess.Popen[bytes], inside: view.Inside, mp: Path,
                             log_path: Path, p: MemProcess, group_in_view: str) -> None:
    def log() -> str:
        assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}):\n{log_path.read_text()}"
        return log_path.read_text()

    def attr(name: str) -> str:
        return _read(inside(mp / name)).strip()

    def one_shot_partial() -> None:
        _write(inside(mp / "one_shot_scanning"), "1\n")
        wait_until(lambda: attr("one_shot_scanning") == "0", 20, what="the partial request to be served")

    wait_until(lambda: log() and inside(mp / "full_scans").exists() and attr("full_scans") == "3", 60,
               what="the 3 initial full scans in the view")
    assert FOUND in log() and "cgroup v1 freezer" not in log()
    assert not mounted_at(mp)  # the FUSE mount is the view's alone

    before = int(attr("pages_scanned"))
    one_shot_partial()
    assert int(attr("pages_scanned")) == before and "partial scan:" not in log()

    cgroups.freeze(str(inside(group_in_view)), True)  # cgroup.freeze in the view
    wait_until(lambda: f"freezer hint: {p.pid}@{p.task.start_time} frozen" in log(), 20,
               what="the frozen hint in the daemon's log")
    one_shot_partial()
    wait_until(lambda: "partial scan: 1 processes" in log(), 20, what="the partial scan's log line")
    assert int(attr("pages_scanned")) >= before + 64  # P's 64 data pages at least


def test_daemon_warns_when_it_watches_no_cgroup() -> None:
    """A view with no cgroup mounted at all: the daemon still serves, and says why no
    frozen hint will ever come and what to do instead."""
    skip_unless_fuse()
    with public_tmpdir() as tmp:
        mp, log_path = tmp / "ksm", tmp / "daemon.log"
        mp.mkdir()
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                view.command([sys.executable, "-m", "lksmfs.cli", "mount", str(mp)], cgroup2=False),
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            inside = view.Inside(daemon.pid)
            wait_until(lambda: daemon.poll() is not None or inside(mp / "run").exists(), 30,
                       what="the daemon to serve in the view")
            assert daemon.poll() is None, log_path.read_text()
        finally:
            rc = _stop(daemon)
        text = log_path.read_text()
        assert rc == 0, text
        assert ("WARNING lksmfs.daemon[MainThread]: freezer: watching no cgroup (no cgroup v1 freezer and no "
                "cgroup2 in /proc/self/mountinfo): frozen tasks are never hinted; write 'PID frozen' to the "
                "hint file, or set freezer.v1_roots/v2_roots\n") in text


def test_workload_spawn_puts_its_cgroups_on_cgroup2() -> None:
    """`lksmfs workload spawn` in the view: groups under /sys/fs/cgroup/lksmfs-workload,
    stderr says so, and they are gone after SIGTERM."""
    proc = subprocess.Popen(
        view.command([sys.executable, "-m", "lksmfs.cli", "workload", "spawn",
                      str(REPO / "config/workloads/small.yaml"), "--json"]),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        records = json.loads(proc.stdout.readline())
        root_in_view = "/sys/fs/cgroup/lksmfs-workload"
        for rec in records:
            assert rec["cgroup"] == f"{root_in_view}/{rec['instance']}"
            host = os.path.join(view.host_root() or "", "lksmfs-workload", rec["instance"])
            assert rec["pid"] in cgroups.procs(host)  # the same tree seen from outside
    finally:
        rc = _stop(proc, signal.SIGTERM)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, err
    assert (f"lksmfs workload spawn: {len(records)} processes, one cgroup each under {root_in_view} "
            f"(cgroup v2: APP/K; removed at exit)\n") in err
    assert not any(os.path.exists(os.path.join(view.host_root() or "", "lksmfs-workload", r["instance"]))
                   for r in records)


def test_make_run_freezes_through_cgroup2(tmp_path: Path) -> None:
    """scripts/demo.py (`make run`) on small.yaml in the view: its groups are cgroup2 ones,
    the daemon says it watches /sys/fs/cgroup, and the app sent to the background was
    scanned by the partial scan its freeze asked for."""
    skip_unless_fuse()
    out = tmp_path / "summary.json"
    r = subprocess.run(view.command([sys.executable, str(REPO / "scripts/demo.py"), "--workload",
                                     str(REPO / "config/workloads/small.yaml"), "--quick", "--json", str(out)]),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "processes in /sys/fs/cgroup/lksmfs-demo-" in r.stdout and "(cgroup v2)" in r.stdout
    assert f"daemon: {FOUND}" in r.stdout
    steps = {s["name"]: s for s in json.loads(out.read_text())["steps"]}
    assert steps["background"]["scans"] == [["partial", 4]]
    # the partial scan read the frozen app (small.yaml's 2 viewers: 19 workload pages each,
    # tests/live/test_demo.py, plus their interpreters).  Without the freeze's hint it would
    # read nothing: every process is known and idle (no newcomer, no VIP with new faults)
    assert steps["background"]["scanned"] >= 2 * 19


def test_configured_roots_override_discovery_kind_by_kind(v2_cgroup: CgroupFactory) -> None:
    """On this hybrid host: v2_roots configured, v1 still found in mountinfo; the start
    log says which came from where."""
    skip_unless_fuse()
    group = v2_cgroup()
    with public_tmpdir() as tmp, Mounts() as mounts:
        cfg = tmp / "lksmfs.yaml"
        cfg.write_text(f"freezer:\n  v2_roots: [{group}]\n")
        d = mounts.start("--config", str(cfg))
        v1 = cgroups.discover()[0]
        found = "".join(f"cgroup v1 freezer at {r}, " for r in v1)
        want = (f"freezer: watching {found}cgroup2 at {group} (configured)" if not v1 else
                f"freezer: watching {found[:-2]} (found in /proc/self/mountinfo), cgroup2 at {group} (configured)")
        assert f"INFO lksmfs.daemon[MainThread]: {want}\n" in d.log()
        assert d.terminate() == 0


def test_a_configured_root_that_does_not_exist_stops_the_start() -> None:
    with public_tmpdir() as tmp:
        cfg = tmp / "lksmfs.yaml"
        cfg.write_text("freezer:\n  v2_roots: [/sys/fs/cgroup/lksmfs-no-such-group]\n")
        r = subprocess.run([sys.executable, "-m", "lksmfs.cli", "mount", str(tmp / "ksm"), "--config", str(cfg)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr == (f"lksmfs mount: {cfg}: freezer.v2_roots: /sys/fs/cgroup/lksmfs-no-such-group: no such "
                            "directory (expected a cgroup2 group)\n")
        assert not (tmp / "ksm").exists()  # refused before anything was made
