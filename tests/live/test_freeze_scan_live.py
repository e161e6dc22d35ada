"""A real freeze, through the real cgroup freezer (v1 freezer.state, v2 cgroup.freeze),
reaches the engine as a FROZEN slot, and a one-shot partial scan scans that slot - whole,
without LKSM_FILTER - and nothing else (root).

The engine runs on a ProcfsSource scoped to the test's two cgroups, the FreezerWatcher
hints it under the lock the daemon would hold, and the crawler and scanner are driven
step by step at virtual time (testkit.engine.settle), as the daemon's threads would.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lksmfs.daemon.freezer import FreezerWatcher
from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import (
    KSM_MM_FROZEN,
    KSM_MM_LISTED,
    KSM_MM_SCANNED,
    KSM_RUN_ONESHOT,
    LKSM_SCAN_FULL,
    LKSM_SCAN_NONE,
    LKSM_SCAN_PARTIAL,
)
from lksmfs.sources.base import TaskId
from lksmfs.sources.procfs import ProcfsSource
from lksmfs.sources.scope import Scope
from testkit.engine import RangeCounts, file_children, range_counts, settle, smaps_anon_pages

pytestmark = pytest.mark.live

DEADLINE = 5.0  # the watcher promises 200 ms
SAME, UNIQUE = 2, 6  # pages of the children's file .data: 2 that merge, 6 that never do
N = SAME + UNIQUE


@pytest.mark.parametrize("version", [1, 2], ids=["v1-freezer.state", "v2-cgroup.freeze"])
def test_frozen_slot_is_picked_by_partial_scan_and_scanned_unfiltered(
    version: int, request: pytest.FixtureRequest, live: Any, tmp_path: Path
) -> None:
    make: Callable[[], str] = request.getfixturevalue(
        "v1_freezer_cgroup" if version == 1 else "v2_cgroup")
    state_file, freeze, thaw = (("freezer.state", "FROZEN", "THAWED") if version == 1
                                else ("cgroup.freeze", "1", "0"))
    g_frozen, g_other = make(), make()
    with file_children(str(tmp_path / "libdata.so"), SAME, UNIQUE) as spawn:
        a, b = spawn(), spawn()  # a is frozen later, b stays running
        live.move_to_cgroup(g_frozen, a.pid)
        live.move_to_cgroup(g_other, b.pid)
        ta, tb = a.task, b.task
        src = ProcfsSource(scope=Scope(cgroups=[g_frozen, g_other]))
        ksm = Ksm(src, self_pid=os.getpid())
        lock = threading.Lock()
        hints: list[tuple[TaskId, bool]] = []

        def on_hint(t: TaskId, frozen: bool) -> None:
            with lock:
                ksm.hint(t, frozen)
                hints.append((t, frozen))

        def state() -> int:
            with lock:
                return ksm.slots[ta].state

        watcher = FreezerWatcher(
            on_hint, v1_roots=[live.v1_freezer] if version == 1 else [],
            v2_roots=[live.v2_root] if version == 2 else [], scope=src.scope)
        try:
            watcher.start()
            ksm.set_run(KSM_RUN_ONESHOT)
            now = settle(ksm, 0.0, lock)  # the crawler's 3 initial full scans
            assert ksm.counters()["full_scans"] == 3
            for _ in range(3):
                assert ksm.request_one_shot(LKSM_SCAN_FULL)
                now = settle(ksm, now, lock)
            assert ksm.counters()["full_scans"] == 6
            assert set(ksm.slots) == {ta, tb}
            sa, sb = ksm.slots[ta], ksm.slots[tb]
            assert sa.state == sb.state == KSM_MM_LISTED | KSM_MM_SCANNED
            # Full scan 6 was filtered: the .data file region was born in crawl round 0,
            # so it is mature (> 5 rounds old) in round 6, and its bitmap holds only the
            # offsets that merged (0 and 1).  A listed slot scans just those; the items of
            # the never-merged offsets were freed as the scan passed them.
            for k, t in ((a, ta), (b, tb)):
                assert range_counts(ksm, t, k.vpn("data"), N) == RangeCounts(SAME, SAME, 0)
            anon_a = smaps_anon_pages(a.pid)
            assert sa.nr_scans < anon_a

            # freeze, then thaw before any scan: FROZEN and queued, then LISTED again and,
            # since it was SCANNED already, off the scan list (lksm_task_thawed)
            live.write(os.path.join(g_frozen, state_file), freeze)
            live.wait_until(lambda: state() & KSM_MM_FROZEN, DEADLINE)
            with lock:
                assert sa.state == KSM_MM_FROZEN | KSM_MM_SCANNED  # LISTED cleared
                assert sa in ksm.mm.scan_list and ksm.mm.nr_frozen() == 1
            live.write(os.path.join(g_frozen, state_file), thaw)
            live.wait_until(lambda: state() & KSM_MM_LISTED, DEADLINE)
            with lock:
                assert sa.state == KSM_MM_LISTED | KSM_MM_SCANNED
                assert sa not in ksm.mm.scan_list and ksm.mm.nr_frozen() == 0
            scans_a = sa.nr_scans
            assert ksm.request_one_shot(LKSM_SCAN_PARTIAL)
            now = settle(ksm, now, lock)
            assert sa.nr_scans == scans_a  # a thawed slot is no longer picked
            assert ksm.tunables.one_shot_scanning == LKSM_SCAN_NONE

            # freeze again and ask for a partial scan: it scans a, and only a
            live.write(os.path.join(g_frozen, state_file), freeze)
            live.wait_until(lambda: state() & KSM_MM_FROZEN, DEADLINE)
            scans_a, scans_b = sa.nr_scans, sb.nr_scans
            assert ksm.request_one_shot(LKSM_SCAN_PARTIAL)
            now = settle(ksm, now, lock)
            last = ksm.last_scan
            assert last["mode"] == LKSM_SCAN_PARTIAL and last["slots_scanned"] == 1
            assert ksm.tunables.one_shot_scanning == LKSM_SCAN_NONE
            assert sb.nr_scans == scans_b  # listed, not a newcomer, faults unchanged
            # unfiltered: every anonymous page of the frozen task (counted from smaps,
            # not through the source), the 6 never-merged .data pages included; frozen
            # pages skip the checksum gate, so those go straight into the unstable tree
            assert sa.nr_scans - scans_a == last["pages_scanned"] == anon_a
            assert range_counts(ksm, ta, a.vpn("data"), N) == RangeCounts(N, SAME, UNIQUE)
            assert range_counts(ksm, tb, b.vpn("data"), N) == RangeCounts(SAME, SAME, 0)

            # Scanned while frozen, the slot is now SCANNED only: the end of its scan
            # clears FROZEN and nothing but a thaw of a FROZEN slot (or allocation) sets
            # LISTED, so the thaw that follows changes nothing (as in the seed).
            with lock:
                assert sa.state == KSM_MM_SCANNED and ksm.mm.nr_frozen() == 0
            live.write(os.path.join(g_frozen, state_file), thaw)
            live.wait_until(lambda: hints[-1:] == [(ta, False)], DEADLINE)
            with lock:
                assert sa.state == KSM_MM_SCANNED
            assert watcher.errors == 0
        finally:
            watcher.stop()
            src.close()
            with contextlib.suppress(OSError):  # a v1-frozen child could not be killed
                live.write(os.path.join(g_frozen, state_file), thaw)
