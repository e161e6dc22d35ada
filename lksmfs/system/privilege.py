"""What this process may do: the capabilities lksmfs needs, and which of them it lacks.

Root normally has them all; root in a container, or a service with a bounding set, may
not.  These are the capabilities systemd/lksmfs.service grants, and why (capabilities(7),
proc(5)):

- CAP_SYS_ADMIN: mount(2) the FUSE file system; page frame numbers in /proc/PID/pagemap
  and /proc/kpageflags;
- CAP_SYS_PTRACE: read /proc/PID/mem, maps and pagemap of other users' processes
  (ptrace_may_access, PTRACE_MODE_READ);
- CAP_DAC_READ_SEARCH: read /proc/PID/* and cgroup files whatever their owner and mode.
"""

from __future__ import annotations

import os

from lksmfs.system.proc import PROC_ROOT

CAP_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}
MOUNT_CAPS = ("CAP_SYS_ADMIN",)
READ_CAPS = ("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")
UNIT_CAPS = ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")


def effective_caps(proc_root: str = PROC_ROOT) -> int:
    """The CapEff mask of this process (0 if /proc cannot say)."""
    try:
        with open(f"{proc_root}/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def missing(names: tuple[str, ...], caps: int | None = None) -> list[str]:
    """The capabilities of `names` this process does not have in effect."""
    mask = effective_caps() if caps is None else caps
    return [n for n in names if not mask >> CAP_BITS[n] & 1]


def who() -> str:
    """'uid 65534' or 'root': for messages that say why something is refused."""
    uid = os.geteuid()
    return "root" if uid == 0 else f"uid {uid}"
