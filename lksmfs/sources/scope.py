"""Scope narrowing: which processes the daemon may look at at all.

LKSM scans every process (for_each_process).  A user-space daemon often should not:
one app's cgroup, a handful of pids, everything but some noisy commands.  The scope
is applied where tasks are enumerated (ProcfsSource.tasks) and where hints are made
(the freezer watcher), so full scans, newcomers and frozen hints all agree.

Rules: with neither `pids` nor `cgroups` every process is in; otherwise a process is in
when its pid is listed OR it belongs to one of the cgroup directories (or a cgroup
below one: a frozen app's helper cgroups are still the app).  `exclude_comms` then
removes processes by comm (/proc/PID/comm, at most 15 characters as the kernel keeps).

Cgroup membership is read from each directory's `cgroup.procs`, which exists in both
cgroup v1 and v2, so the directory path can be given exactly as the user sees it
(/sys/fs/cgroup/freezer/app1 or /sys/fs/cgroup/unified/app1).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from lksmfs.system.cgroups import cgroup_pids
from lksmfs.system.proc import PROC_ROOT, read_comm, try_stat

__all__ = ["Scope", "ScopeSnapshot", "Unmatched"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScopeSnapshot:
    """A scope with its cgroup membership read once: cheap per-pid checks for one pass."""

    scope: Scope
    members: frozenset[int] | None  # None: no inclusion list, everybody is in

    def allows(self, pid: int, comm: str) -> bool:
        if self.members is not None and pid not in self.members:
            return False
        return comm not in self.scope.exclude_comms


@dataclass(frozen=True)
class Unmatched:
    """A pid or cgroup of the scope that names nothing scannable now, and why: what
    `lksmfs scan` reports as skipped and `lksmfs mount` warns about at start."""

    reason: str  # no_such_process, kernel_thread, itself, no_such_cgroup, not_a_cgroup, empty_cgroup
    message: str
    pid: int | None = None
    comm: str | None = None
    cgroup: str | None = None

    @property
    def what(self) -> str:
        """'pid 4242 (sleep)' or 'cgroup /sys/fs/cgroup/app'."""
        if self.pid is None:
            return f"cgroup {self.cgroup}"
        return f"pid {self.pid}" + (f" ({self.comm})" if self.comm else "")


@dataclass
class Scope:
    """Inclusion by pid or cgroup (union), then exclusion by comm; empty means everything."""

    pids: set[int] = field(default_factory=set)
    cgroups: list[str] = field(default_factory=list)
    exclude_comms: set[str] = field(default_factory=set)

    @property
    def unrestricted(self) -> bool:
        return not self.pids and not self.cgroups and not self.exclude_comms

    def members(self) -> frozenset[int] | None:
        """The pids an inclusion list admits right now; None when there is no list."""
        if not self.pids and not self.cgroups:
            return None
        out = set(self.pids)
        for d in self.cgroups:
            if not os.path.isdir(d):
                _log.debug("scope cgroup %s does not exist (yet)", d)
                continue
            out |= cgroup_pids(d)
        return frozenset(out)

    def unmatched(self, proc_root: str = PROC_ROOT, self_pid: int | None = None) -> list[Unmatched]:
        """The listed pids and cgroups that name no process to scan right now."""
        out: list[Unmatched] = []
        for pid in sorted(self.pids):
            st = try_stat(pid, proc_root)
            if st is None:
                out.append(Unmatched("no_such_process", "no such process", pid))
            elif pid == self_pid:
                out.append(Unmatched("itself", "that is lksmfs itself", pid, st.comm))
            elif st.kthread:
                out.append(Unmatched("kernel_thread", "a kernel thread: no user memory to scan", pid, st.comm))
        for d in self.cgroups:
            if not os.path.isdir(d):
                out.append(Unmatched("no_such_cgroup", "no such cgroup directory", cgroup=d))
            elif not os.path.exists(os.path.join(d, "cgroup.procs")):
                out.append(Unmatched("not_a_cgroup", "not a cgroup directory (no cgroup.procs)", cgroup=d))
            elif not cgroup_pids(d):
                out.append(Unmatched("empty_cgroup", "no process in this cgroup or below", cgroup=d))
        return out

    def snapshot(self) -> ScopeSnapshot:
        """Read cgroup membership once, for checking many pids (a tasks() pass)."""
        return ScopeSnapshot(self, self.members())

    def allows(self, pid: int, comm: str) -> bool:
        """Is process `pid` named `comm` in scope (reads cgroup membership now)?"""
        return self.snapshot().allows(pid, comm)

    def allows_pid(self, pid: int, proc_root: str = PROC_ROOT, comm: str | None = None) -> bool:
        """Like allows() but reads the comm itself when needed; a gone pid is out."""
        if self.unrestricted:
            return True
        if comm is None and self.exclude_comms:
            comm = read_comm(pid, proc_root)
            if comm is None:
                return False
        return self.allows(pid, comm or "")
