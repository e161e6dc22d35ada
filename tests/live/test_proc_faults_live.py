"""A real process that exits at chosen steps of its scan, on the real /proc.

The unit test (tests/unit/test_proc_faults.py) makes up every way a dying task answers;
here the kernel answers.  A victim process (two mappings of pairs of equal pages) and a
survivor (32 equal pages) are scanned by an engine over ProcfsSource in this process.
A recording scan lists the steps of the victim's handling (testkit.procsteps); then,
for the first step of each kind (each file opened, read or listed) and the second read
of pagemap and of mem (mid-pagemap, mid-mem), a fresh victim is SIGKILLed right before
that step and left a zombie, or reaped as well.  Both policies.  Each time: the scans
complete, the victim has no slot, it is counted once if it had one - as exited, never
as failed (a real death is never an unexpected error) - the survivor is still there,
and the totals are exactly the remaining slots' items (the victim's left them).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import POLICY_KSM, POLICY_LKSM
from lksmfs.sources.base import TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from lksmfs.system.proc import state
from lksmfs.system.waiting import wait_until
from testkit.engine import check_counters
from testkit.memproc import MemProcess
from testkit.patterns import Region
from testkit.procsteps import ProcSteps, full_scans, use

pytestmark = pytest.mark.live

SCANS = 2


def victim() -> MemProcess:
    return MemProcess(Region("a", [(2, 0x61), (2, 0x62), (2, 0x63)]), Region("b", [(2, 0x64), (2, 0x65)]),
                      cpu_ms=150, merge=True)


@pytest.fixture(scope="module")
def survivor() -> Iterator[MemProcess]:
    with MemProcess(Region("data", [(32, 0x4D)]), cpu_ms=150, merge=True) as p:
        yield p


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Callable[[ProcSteps], None]:
    return lambda steps: use(monkeypatch, steps)


def scans(pids: list[int], policy: str, joined: set[TaskId] | None = None) -> Ksm:
    src = ProcfsSource(self_pid=os.getpid(), scope=Scope(pids=set(pids)))
    return full_scans(src, policy, SCANS, joined, self_pid=os.getpid())


def row(ksm: Ksm, pid: int) -> tuple[int, int]:
    (r,) = [p for p in ksm.per_process() if p["pid"] == pid]
    return int(r["rmap_items"]), int(r["merging_pages"])


def label(step: str) -> str:
    """'read smaps' of 'read smaps', 'open /proc/123/stat' -> 'open stat'."""
    verb, path = step.split(" ", 1)
    name = path.rsplit("/", 1)[-1]
    return f"{verb} {'the directory' if name.isdigit() else name}"


def chosen(steps: list[str]) -> list[int]:
    """The first step of each kind, and the second read of pagemap and of mem."""
    seen: dict[str, int] = {}
    out = []
    for i, s in enumerate(steps):
        verb = s.split(" ", 1)[0]
        key = label(s)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == 0 or (n == 1 and verb in ("pread", "preadv", "process_vm_readv")):
            out.append(i)
    return out


@pytest.mark.parametrize("policy", [POLICY_LKSM, POLICY_KSM])
def test_a_process_killed_at_any_kind_of_step_is_dropped_cleanly(
    survivor: MemProcess, patched: Callable[[ProcSteps], None], policy: str
) -> None:
    ref = scans([survivor.pid], policy)
    assert row(ref, survivor.pid)[1] >= 32  # its 32 equal pages are merged (the interpreter's may be too)
    with victim() as v:
        rec = ProcSteps("/proc", v.pid, None, lambda: None)
        patched(rec)
        alive = scans([survivor.pid, v.pid], policy)
        assert row(alive, v.pid)[1] >= 10  # five pairs of equal pages, each pair merged
    labels = [label(s) for s in rec.steps]
    # memory is read by process_vm_readv(2) where the kernel allows it, else by preadv of mem
    mem_read = "process_vm_readv mem" if ProcfsSource().vm_read else "preadv mem"
    for want in ("read stat", "read schedstat", "read smaps", "listdir task", "pread pagemap", mem_read):
        assert want in labels, (want, labels)
    for at in chosen(rec.steps):
        for reap in (False, True):
            with victim() as v:
                task = v.task

                def die(v: MemProcess = v, reap: bool = reap) -> None:
                    os.kill(v.pid, signal.SIGKILL)
                    wait_until(lambda: state(v.pid) in ("Z", ""), 10)
                    if reap:
                        v.proc.wait(10)

                steps = ProcSteps("/proc", v.pid, at, die)
                patched(steps)
                joined: set[TaskId] = set()
                ksm = scans([survivor.pid, v.pid], policy, joined)
                where = f"killed before step {at} ({rec.steps[at]}), {'reaped' if reap else 'a zombie'}"
                assert steps.dead, where
                assert task not in ksm.slots, where
                c = ksm.counters()
                assert (c["tasks_exited"], c["tasks_failed"], c["tasks_denied"]) == \
                    (1 if task in joined else 0, 0, 0), where
                # the victim's pages left the totals: they are the slots' own (the survivor's
                # interpreter pages may have merged with the victim's while it lived)
                check_counters(ksm, quiescent=True)
                assert row(ksm, survivor.pid)[1] >= 32, where
