"""Fault injection: a task that dies at every step of its handling, every way a task dies.

The engine runs over ProcfsSource on a fake /proc tree of three tasks: A (the victim),
B and C.  A's pages hold contents no one else has (pairs of equal pages among its own),
B and C share pages, so whatever happens to A, B's and C's merges are those of a run
in which A never existed - the reference.  Every call through which the source touches
A's files (opening one, reading one, listing task/, pread on pagemap, preadv on mem) is
a step; one run per step and per way of dying makes that step the one where A dies:

- ESRCH / ENOENT: the call fails so, and A is reaped: its /proc directory is gone
  (opens relative to the pinned directory answer ENOENT) and reads of fds already open
  answer ESRCH;
- EIO: the call fails so (an exited mm's mem and pagemap), and A is a zombie;
- empty: the call reads nothing (0 bytes, an empty listing), and A is a zombie;
- truncated: the call reads half of what it would, and A is a zombie.

A zombie's stat says Z, its status has no Vm lines, its smaps, maps, ksm_stat,
pagemap and mem are empty - as the kernel shows a task whose mm is gone.  Each run makes
three full scans: they complete; A has no slot; A is counted once if it had one
(tasks_exited, or tasks_failed) and not at all if it died before it joined; every
figure but those counts equals the reference's.  Both policies.  Last, over the
in-memory source: a victim that dies at each read of its pages while a chunk larger
than a READ_BLOCK is settled (its pages read again for the comparisons) leaves totals
that are exactly the remaining slots' items.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from memfake import FakeSource, fill

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.pages import READ_BLOCK
from lksmfs.engine.params import POLICY_KSM, POLICY_LKSM
from lksmfs.sources.base import PAGE_SIZE, Mapping, TaskId
from lksmfs.sources.procfs import ProcfsSource
from testkit.engine import check_counters
from testkit.procsteps import ProcSteps, full_scans, use

PRESENT, EXCLUSIVE = 1 << 63, 1 << 56
HEAP_VPN = 0x1000  # the fake heap's first page (address 0x1000000)
OTHER_VPN = 0x2000  # another anonymous mapping's
BIG = READ_BLOCK + 16  # its pages
NPAGES = 8
START = 4242
A, B, C = 100, 200, 300
KINDS = ("ESRCH", "ENOENT", "EIO", "empty", "truncated")
SCANS = 3


def _page(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def write_task(root: Path, pid: int, vmas: list[tuple[int, list[bytes | None]]]) -> TaskId:
    """/proc/PID of a running task with anonymous mappings (first vpn, pages; None: a
    page not present), two threads, 200 ms of CPU time (no short task) and KSM
    registration (mainline)."""
    d = root / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    (d / "task" / str(pid + 1)).mkdir()
    _stat(d, pid, "S")
    npages = sum(p is not None for _, pages in vmas for p in pages)
    (d / "status").write_text(f"Name:\tt{pid}\nState:\tS\nVmRSS:\t 100 kB\nRssAnon:\t{npages * 4} kB\n")
    for sched in (d / "schedstat", d / "task" / str(pid) / "schedstat", d / "task" / str(pid + 1) / "schedstat"):
        sched.write_text("200000000 0 1\n")
    smaps = maps = ""
    with open(d / "pagemap", "wb") as pm, open(d / "mem", "wb") as mem:
        for first, pages in vmas:
            start, end = first * PAGE_SIZE, (first + len(pages)) * PAGE_SIZE
            head = f"{start:08x}-{end:08x} rw-p 00000000 00:00 0 {'[heap]' if first == HEAP_VPN else ''}\n"
            maps += head
            smaps += head + (f"Anonymous: {sum(p is not None for p in pages) * 4} kB\nAnonHugePages: 0 kB\n"
                             "VmFlags: rd wr mr mw me ac mg\n")
            pm.seek(first * 8)
            pm.write(struct.pack(f"<{len(pages)}Q", *[0 if page is None else PRESENT | EXCLUSIVE | (pid * 64 + i)
                                                       for i, page in enumerate(pages)]))
            for i, page in enumerate(pages):
                if page is not None:
                    mem.seek(start + i * PAGE_SIZE)
                    mem.write(page)
    (d / "smaps").write_text(smaps)
    (d / "maps").write_text(maps)
    (d / "ksm_stat").write_text("ksm_rmap_items 0\nksm_merging_pages 0\nksm_mergeable: yes\nksm_merge_any: no\n")
    return TaskId(pid, START)


def _stat(d: Path, pid: int, state: str) -> None:
    (d / "stat").write_text(f"{pid} (t{pid}) {state} 1 1 1 0 -1 4194560 10 0 0 0 20 0 0 0 20 0 2 0 {START} "
                            "4096 1 end\n")


def make_zombie(d: Path) -> None:
    """What the kernel shows of a task that exited but is not reaped: no mm."""
    pid = int(d.name)
    _stat(d, pid, "Z")
    (d / "status").write_text(f"Name:\tt{pid}\nState:\tZ (zombie)\n")
    for name in ("smaps", "maps", "ksm_stat", "pagemap", "mem"):
        os.truncate(d / name, 0)


def tree(root: Path, with_a: bool = True) -> None:
    root.mkdir()
    (root / "kpageflags").write_bytes(bytes(8 * 1024 * 64))
    if with_a:  # contents only A has, each twice; two runs of pages in the heap (two reads
        # of mem), a second mapping (a second read of pagemap) larger than a READ_BLOCK:
        # its chunk keeps only digests and the merges read its pages again (mid-chunk)
        heap: list[bytes | None] = [_page(0xA0 + i // 2) for i in range(NPAGES)]
        heap[3:5] = [None, None]
        big: list[bytes | None] = [_page(0xB0 + i % (BIG // 2)) for i in range(BIG)]
        write_task(root, A, [(HEAP_VPN, heap), (OTHER_VPN, big)])
    shared: list[bytes | None] = [_page(0x10 + i % 3) for i in range(NPAGES)]
    write_task(root, B, [(HEAP_VPN, shared)])
    write_task(root, C, [(HEAP_VPN, shared[::-1])])


class Faults(ProcSteps):
    """A dies at step `at`, the way `kind` says."""

    def __init__(self, root: Path, kind: str, at: int | None) -> None:
        super().__init__(str(root), A, at, lambda: self._die(root / str(A)), kind)

    def _die(self, d: Path) -> None:
        if self.kind in ("ESRCH", "ENOENT"):
            shutil.rmtree(d)
            self.dead = "reaped"
        else:
            make_zombie(d)
            self.dead = "zombie"


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Callable[[ProcSteps], None]:
    """A setter: the Faults the modules that read /proc use from now on."""
    return lambda steps: use(monkeypatch, steps)


def run(root: Path, policy: str, joined: set[TaskId] | None = None) -> Ksm:
    """SCANS full scans of the tree by a fresh engine; `joined` collects the tasks that
    got a slot."""
    return full_scans(ProcfsSource(str(root), self_pid=None), policy, SCANS, joined)


def figures(ksm: Ksm) -> dict[str, int]:
    """The totals, but the counts of tasks dropped and of the work done (A's pages
    scanned before it died count as scanned)."""
    return {k: v for k, v in ksm.counters().items()
            if not k.startswith("tasks_") and k not in ("pages_scanned", "pages_skipped")}


def others(ksm: Ksm) -> list[tuple[int, int, int]]:
    return sorted((p["pid"], p["rmap_items"], p["merging_pages"]) for p in ksm.per_process()  # type: ignore[misc]
                  if p["pid"] != A)


@pytest.mark.parametrize("policy", [POLICY_LKSM, POLICY_KSM])
@pytest.mark.parametrize("kind", KINDS)
def test_a_task_dying_at_any_step_is_dropped_and_counted(
    tmp_path: Path, patched: Any, policy: str, kind: str
) -> None:
    tree(ref_root := tmp_path / "ref", with_a=False)
    ref = run(ref_root, policy)
    assert ref.counters()["pages_sharing"] > 0  # B and C merge: the reference is not empty
    # the recording run: every step of A's, A alive throughout
    tree(tmp_path / "rec")
    rec = Faults(tmp_path / "rec", kind, None)
    patched(rec)
    alive = run(tmp_path / "rec", policy)
    a = TaskId(A, START)
    assert a in alive.slots and alive.counters()["pages_sharing"] > ref.counters()["pages_sharing"]
    steps = list(rec.steps)
    # mid-mem and mid-pagemap steps: between two reads of each
    assert sum(s.startswith("preadv") for s in steps) >= 2
    assert sum(s.startswith("pread ") for s in steps) >= 2
    assert any(s.startswith("listdir") for s in steps)  # task/, for the cpu mark
    for at, what in enumerate(steps):
        root = tmp_path / f"{kind}{at}"
        tree(root)
        faults = Faults(root, kind, at)
        patched(faults)
        joined: set[TaskId] = set()
        ksm = run(root, policy, joined)
        where = f"{kind} at step {at} ({what})"
        assert faults.dead, where
        assert a not in ksm.slots, where
        c = ksm.counters()
        assert c["tasks_exited"] + c["tasks_failed"] == (1 if a in joined else 0), where
        assert c["tasks_denied"] == 0, where
        assert figures(ksm) == figures(ref), where
        assert others(ksm) == others(ref), where


def test_every_kind_of_step_is_reached(tmp_path: Path, patched: Any) -> None:
    """The steps the test above goes through include each file the source reads of a
    task, under each policy (so a file the engine starts to read is covered too)."""
    for policy, files in ((POLICY_LKSM, {"stat", "schedstat", "status", "smaps", "task", "pagemap", "mem"}),
                          (POLICY_KSM, {"stat", "schedstat", "status", "smaps", "task", "pagemap", "mem",
                                        "ksm_stat"})):
        root = tmp_path / policy
        tree(root)
        rec = Faults(root, "EIO", None)
        patched(rec)
        run(root, policy)
        seen = {s.split()[-1].rsplit("/", 1)[-1] for s in rec.steps}
        assert files <= seen, (policy, sorted(seen))


def test_an_unexpected_error_drops_the_task_with_one_warning(
    tmp_path: Path, patched: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An errno no rule maps (EINVAL from mem while A lives): A is given up - counted in
    tasks_failed, named with the errno in one warning - and the scan goes on."""
    tree(tmp_path / "p")

    class Einval(Faults):
        def preadv(self, fd: int, buffers: list[Any], offset: int) -> int:
            if fd in self.fds:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return os.preadv(fd, buffers, offset)

    patched(Einval(tmp_path / "p", "EIO", None))
    with caplog.at_level("WARNING"):
        src = ProcfsSource(str(tmp_path / "p"), self_pid=None)
        ksm = Ksm(src, policy=POLICY_LKSM)
        rec = ksm.full_scan()
    c = ksm.counters()
    assert (c["tasks_failed"], c["tasks_exited"], rec["tasks_failed"]) == (1, 0, 1)
    assert TaskId(A, START) not in ksm.slots and len(ksm.slots) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{A}@{START}: dropping the task after an unexpected error in read_pages: "
                        "[Errno 22] EINVAL Invalid argument"]
    assert not any(r.exc_info for r in caplog.records if r.levelno >= 30)  # no traceback



class DyingSource(FakeSource):
    """The victim's `die_at`-th page read fails: it exited (ProcessGone), and is gone."""

    def __init__(self, victim_name: str, die_at: int | None) -> None:
        super().__init__()
        self.victim_name = victim_name
        self.die_at = die_at
        self.victim_reads = 0

    def read_pages(self, task: TaskId, vpns: Any, out: memoryview | None = None) -> memoryview:
        if task in self.procs and self.procs[task].comm == self.victim_name:
            self.victim_reads += 1
            if self.victim_reads == self.die_at:
                self.kill(task)
        return super().read_pages(task, vpns, out)


def _chunk_world(src: DyingSource) -> None:
    """A victim whose one chunk is larger than a READ_BLOCK (only digests kept: the merges
    read its pages again, content by content) with contents a partner and itself share;
    both madvised (mainline registers them)."""
    contents = [fill(c) for c in "abcdefgh"]
    for name, base, pages in (("partner", 0x20000000, [c for c in contents for _ in range(4)]),
                              ("victim", 0x30000000, [contents[i % len(contents)] for i in range(READ_BLOCK * 2)])):
        m = Mapping(base, base + len(pages) * PAGE_SIZE, vm_mergeable=True)
        src.add(name, [(m, dict(enumerate(pages)))])


@pytest.mark.parametrize("policy", [POLICY_LKSM, POLICY_KSM])
def test_a_task_dying_while_its_chunk_is_settled_leaves_the_totals(policy: str) -> None:
    """Every read of the victim's pages in turn is the one it dies at: after the scans
    every figure is the remaining slots' own (check_counters) - none of the victim's
    items, merged before it died in the middle of its chunk, stays counted."""
    rec = DyingSource("victim", None)
    _chunk_world(rec)
    ksm = Ksm(rec, short_task_ms=0, policy=policy)
    for _ in range(SCANS):
        ksm.full_scan()
    assert rec.victim_reads >= 3 and ksm.counters()["pages_sharing"] > 0
    for at in range(1, rec.victim_reads + 1):
        src = DyingSource("victim", at)
        _chunk_world(src)
        ksm = Ksm(src, short_task_ms=0, policy=policy)
        for _ in range(SCANS):
            ksm.full_scan()
        c = check_counters(ksm, quiescent=True)
        assert [s.comm for s in ksm.slots.values()] == ["partner"], at
        assert c["tasks_exited"] == 1, at
