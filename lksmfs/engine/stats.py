"""The engine's counters: mm/ksm.c's ksm_pages_* globals and LKSM's statistics.

The stable tree keeps its own counters (pages_shared, pages_sharing, chains, dups):
they change with its nodes.  Everything else that sysfs or a scan record shows lives
here, in one place, so that a reader can see which figure each step moves; so do the
scan record itself and what a prepared scan left out (Ksm.last_scan, Ksm.skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from lksmfs.sources.base import AccessDenied, TaskFailed

Record = dict[str, float | int]


def scan_record(mode: int, slots_scanned: int = 0, pages_scanned: int = 0, merged: int = 0, broken: int = 0,
                wall_s: float = 0.0, tasks_failed: int = 0) -> Record:
    """What the engine tells of the last scan (Ksm.last_scan): LKSM's per-scan
    statistics (lksm_nr_scanned_slot, lksm_nr_merged, lksm_nr_broken) and the tasks given
    up on an unexpected error, built here only."""
    return {"mode": mode, "slots_scanned": slots_scanned, "pages_scanned": pages_scanned, "merged": merged,
            "broken": broken, "wall_s": wall_s, "tasks_failed": tasks_failed}


@dataclass(frozen=True)
class Skipped:
    """A task the last prepared scan left out, and why (Ksm.skipped).  Not a kernel
    structure: LKSM skips silently; user space is told (lksmfs scan) what was left out
    and why."""

    comm: str
    reason: str  # crawler.SKIP_SHORT, crawler.SKIP_DENIED or ksmd.SKIP_NOT_MERGEABLE
    runtime_ns: int = 0  # se.sum_exec_runtime when it was checked (SKIP_SHORT)


@dataclass
class KsmStats:
    """Counters not owned by the stable tree."""

    pages_unshared: int = 0  # ksm_pages_unshared: rmap items in the unstable tree
    rmap_items: int = 0  # ksm_rmap_items
    pages_scanned: int = 0  # mainline's ksm_pages_scanned
    pages_skipped: int = 0  # mainline's ksm_pages_skipped (smart_scan; lksmfs.engine.ksmd)
    ksm_zero_pages: int = 0  # pages merged with the zero page (use_zero_pages)
    nr_added_process: int = 0  # ksm_nr_added_process: scanning_process
    nr_full_scan: int = 0  # ksm_scan.nr_full_scan: full_scans
    tasks_exited: int = 0  # slots dropped because the task went away
    tasks_denied: int = 0  # tasks skipped or dropped because /proc refused access
    tasks_failed: int = 0  # tasks dropped after an unexpected error (proc.TaskFailed)
    # LKSM's per-scan and per-slot statistics (lksm_nr_merged, lksm_slot_nr_merged, ...)
    lksm_nr_merged: int = 0
    lksm_nr_broken: int = 0
    lksm_nr_scanned_slot: int = 0
    slot_nr_merged: int = 0
    slot_nr_broken: int = 0

    def merged(self, n: int = 1) -> None:
        """stable_tree_append() found `n` mappings sharing."""
        self.lksm_nr_merged += n
        self.slot_nr_merged += n

    def broken(self, n: int = 1) -> None:
        """remove_rmap_item_from_tree() took `n` sharing mappings off a KSM page."""
        self.lksm_nr_broken += n
        self.slot_nr_broken += n

    def failed(self, err: BaseException) -> bool:
        """Count `err` in tasks_failed if it is a TaskFailed (a task given up on after an
        unexpected error); whether it was."""
        if isinstance(err, TaskFailed):
            self.tasks_failed += 1
            return True
        return False

    def dropped(self, err: BaseException) -> None:
        """A task left the engine because of `err`: counted by why."""
        if isinstance(err, AccessDenied):
            self.tasks_denied += 1
        elif not self.failed(err):
            self.tasks_exited += 1

    def end_slot(self) -> None:
        self.slot_nr_merged = self.slot_nr_broken = 0

    def end_scan(self) -> None:
        self.lksm_nr_merged = self.lksm_nr_broken = self.lksm_nr_scanned_slot = 0
