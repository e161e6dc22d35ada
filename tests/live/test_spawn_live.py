"""Real processes realising small.yaml: layout in /proc/PID/maps, contents in /proc/PID/mem,
anonymity in pagemap/kpageflags, freezing through the cgroup, and cleanup."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lksmfs.system.proc import runtime_ns, try_stat
from lksmfs.system.waiting import wait_until
from lksmfs.workload.model import page_bytes
from lksmfs.workload.schema import load_workload
from lksmfs.workload.simulated import SimulatedSource
from lksmfs.workload.spawn import SpawnedWorkload, spawn_workload
from testkit.engine import workload_cgroup_root

pytestmark = pytest.mark.live

SMALL = str(Path(__file__).resolve().parents[2] / "config" / "workloads" / "small.yaml")
FOO, BAR = "libfoo.so.1", "libbar.so.2"
KPF_ANON = 1 << 12
FROZEN_WCHANS = {"do_freezer_trap", "get_signal", "__refrigerator"}


def _wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


def _cgroup_root(tag: str) -> str:
    return workload_cgroup_root(f"lksmfs-spawn-test-{tag}")


def _maps(pid: int) -> list[tuple[int, int, str, int, str, int, str]]:
    """(start, end, perms, offset, dev, inode, path) per line of /proc/PID/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            a, b = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append((a, b, parts[1], int(parts[2], 16), parts[3], int(parts[4]), path))
    return out


def _read(pid: int, addr: int, npages: int) -> list[bytes]:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        buf = os.pread(f.fileno(), npages * 4096, addr)
    return [buf[i * 4096:(i + 1) * 4096] for i in range(npages)]


def _anon_present(pid: int, addr: int, npages: int) -> list[bool]:
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        raw = os.pread(pm.fileno(), 8 * npages, (addr // 4096) * 8)
        for (entry,) in struct.iter_unpack("<Q", raw):
            if not entry >> 63 & 1:
                out.append(False)
                continue
            pfn = entry & ((1 << 55) - 1)
            (flags,) = struct.unpack("<Q", os.pread(kf.fileno(), 8, pfn * 8))
            out.append(bool(flags & KPF_ANON))
    return out


def _gone(pid: int, start_time: int) -> bool:
    st = try_stat(pid)
    return st is None or st.starttime != start_time


def _sim_pages(sim: SimulatedSource, name: str, sid: str) -> list[bytes]:
    inst = sim.instance(name)
    lo, hi = inst.section_slice[sid]
    return [page_bytes(int(k)) for k in inst.keys[lo:hi]]


def test_spawn_small_layout_contents_freeze_and_cleanup() -> None:
    root = _cgroup_root("api")
    workload = load_workload(SMALL)
    sim = SimulatedSource(workload)
    leftovers: list[tuple[int, int]] = []
    with spawn_workload(workload, cgroup_root=root, timeout=30) as procs:
        assert isinstance(procs, SpawnedWorkload)
        assert sorted(procs.instances) == ["player/0", "viewer/0", "viewer/1", "widget/0"]
        leftovers = [(i.pid, i.start_time) for i in procs.live()]
        lib_dir = procs.lib_dir
        for inst in procs.live():
            app = workload.app(inst.app)
            maps = _maps(inst.pid)
            for lib in workload.app_libraries(app):
                st = os.stat(procs.lib_files[lib.name])
                dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
                addr, n = inst.sections[f"lib:{lib.name}:data"]
                k = next(i for i, m in enumerate(maps) if m[0] == addr)
                # .data: a PRIVATE rw mapping of the real file at the section's file offset
                start, end, perms, offset, mdev, ino, path = maps[k]
                assert (perms, offset, mdev, ino, path) == (
                    "rw-p", (lib.text_pages + lib.rodata_pages) * 4096, dev, st.st_ino,
                    procs.lib_files[lib.name])
                assert end - start == lib.data_pages * 4096 == n * 4096
                # text and rodata just before it, from the same file
                assert maps[k - 1][2:3] == ("r--p",) and maps[k - 1][5] == st.st_ino
                assert maps[k - 2][2:3] == ("r-xp",) and maps[k - 2][5] == st.st_ino
                # .bss: anonymous, starting exactly where .data ends
                bstart, bend, bperms, _, _, bino, bpath = maps[k + 1]
                assert (bstart, bend, bperms, bino, bpath) == (
                    end, end + lib.bss_pages * 4096, "rw-p", 0, "")
                assert inst.sections[f"lib:{lib.name}:bss"] == (end, lib.bss_pages)
            heap = next(m for m in maps if m[6] == "[heap]")
            addr, n = inst.sections["heap"]
            assert heap[0] <= addr and addr + n * 4096 <= heap[1]
            stack = next(m for m in maps if m[6] == "[stack]")
            addr, n = inst.sections["stack"]
            assert stack[0] <= addr and addr + n * 4096 <= stack[1]
            # every workload page reads back as the content model says, is present and
            # anonymous (COWed .data included), and equals the simulated source's page
            for sid, (addr, n) in inst.sections.items():
                got = _read(inst.pid, addr, n)
                sec = sim.instance(inst.name).model.sections[sid]
                assert got == [page_bytes(sim.instance(inst.name).model.key(sec, o))
                               for o in range(n)], sid
                assert got == _sim_pages(sim, inst.name, sid), sid
                assert _anon_present(inst.pid, addr, n) == [True] * n, sid
        # shared library pages: equal at equal offsets in every mapper, at different bases
        # (libfoo .data: 2 shared + 1 zero offsets of 4, by the workload's fractions)
        mappers = [procs.instance(n) for n in ("viewer/0", "viewer/1", "player/0")]
        assert len({i.sections[f"lib:{FOO}:data"][0] for i in mappers}) == 3
        pages = [_read(i.pid, *i.sections[f"lib:{FOO}:data"]) for i in mappers]
        same = [o for o in range(4) if len({p[o] for p in pages}) == 1]
        assert len(same) == 3 and sum(pages[0][o] == bytes(4096) for o in same) == 1
        # the short task stayed short, the others passed 100 ms of CPU
        assert runtime_ns(procs.instance("widget/0").pid) < 100_000_000
        assert runtime_ns(procs.instance("player/0").pid) >= 100_000_000

        # freeze an app: its cgroups report frozen, its tasks sit in the freezer
        viewers = procs.live("viewer")
        for i in viewers:
            with open(f"/proc/{i.pid}/wchan") as f:
                assert f.read() not in FROZEN_WCHANS
        procs.freeze("viewer")
        for i in viewers:
            with open(os.path.join(i.cgroup, "cgroup.events" if procs.freezer.version == 2
                                   else "freezer.state")) as f:
                text = f.read()
            assert ("frozen 1" in text) if procs.freezer.version == 2 else text.strip() == "FROZEN"
            # wchan reads "0" while the task is briefly on a runqueue: wait for the trap
            wait_until(lambda i=i: _wchan(i.pid) in FROZEN_WCHANS, 5.0,
                       what=f"{i.name}'s wchan to reach the freezer's trap")
            assert procs.freezer.procs(i.cgroup) == [i.pid] or procs.freezer.version == 1
        # a frozen app's rewrite waits for the thaw (as in the simulated source)
        v0 = procs.instance("viewer/0")
        before = _read(v0.pid, *v0.sections["heap"])
        procs.rewrite("viewer/0", 1.0)
        sim.freeze("viewer")
        sim.rewrite("viewer/0", 1.0)
        assert _read(v0.pid, *v0.sections["heap"]) == before
        procs.thaw("viewer")
        sim.thaw("viewer")
        after = _read(v0.pid, *v0.sections["heap"])
        assert all(a != b for a, b in zip(after, before, strict=True))
        assert after == _sim_pages(sim, "viewer/0", "heap")
        # rounds: player's volatile pages follow the simulated source's
        procs.advance_round(1)
        sim.advance_round(1)
        p0 = procs.instance("player/0")
        for sid, (addr, n) in p0.sections.items():
            assert _read(p0.pid, addr, n) == _sim_pages(sim, "player/0", sid), sid
        cgroups = [i.cgroup for i in procs.live()]
    for pid, start in leftovers:
        assert _gone(pid, start), pid
    assert not any(os.path.exists(c) for c in cgroups)
    assert not os.path.exists(root)
    assert not os.path.exists(lib_dir)


def test_cleanup_after_an_exception() -> None:
    root = _cgroup_root("exc")
    workload = load_workload(SMALL)
    seen: list[tuple[int, int]] = []
    with pytest.raises(RuntimeError, match="boom"), spawn_workload(workload,
                                                                    cgroup_root=root) as procs:
        procs.freeze("player")  # even a frozen one must go
        seen = [(i.pid, i.start_time) for i in procs.live()]
        raise RuntimeError("boom")
    assert len(seen) == 4 and all(_gone(pid, st) for pid, st in seen)
    assert not os.path.exists(root)


def test_cli_prints_json_and_cleans_up_on_sigterm() -> None:
    root = _cgroup_root("cli")
    code = ("import argparse, sys\nfrom lksmfs.commands import workload as spawn\n"
            "p = argparse.ArgumentParser(); spawn.add_parser(p.add_subparsers())\n"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "spawn", SMALL, "--json",
                             "--cgroup-root", root], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        records = json.loads(proc.stdout.readline())
        assert [r["instance"] for r in records] == ["viewer/0", "viewer/1", "player/0",
                                                    "widget/0"]
        for r in records:
            assert r["cgroup"] == os.path.join(root, r["app"], r["instance"].split("/")[1])
            assert not _gone(r["pid"], r["start_time"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while not all(_gone(r["pid"], r["start_time"]) for r in records):
        assert time.monotonic() < deadline, "children survived SIGTERM of the spawner"
        time.sleep(0.01)
    assert not os.path.exists(root)
