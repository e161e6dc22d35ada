"""Page-pattern child for the kernel-KSM oracle: a process whose memory says exactly what we wrote.

Run as ``python -S lksmfs/oracle_child.py SPEC [MIN_CPU_S]`` (by path, with ``-S``, so the runtime
stays small: no site, no lksmfs package, nothing but os/sys/ctypes/struct/time).

Why each step is here:

* ``prctl(PR_SET_THP_DISABLE)`` and ``prctl(PR_SET_MEMORY_MERGE)`` come first in main(), before
  any sizeable allocation (not at import, so a unit test can import `parse_spec` harmlessly):
  every VMA the process will ever have is then mergeable (the same scope as LKSM's ksm_join) and
  every page is a 4 KiB page (a THP is not split for KSM in a way lksmfs could mirror page by
  page).
* The pattern mapping comes from libc ``mmap`` and is written with ``memset``/``memmove`` through
  ctypes: no Python-level temporaries, so no copy of a pattern page is ever left behind in the heap
  (a stray copy would join the pattern's merge group and skew the expected counters).
* After writing, it burns CPU up to MIN_CPU_S (default 0.15 s) so that it is not a "short task"
  (< 100 ms of runtime) that LKSM's crawler skips.
* It prints ``ready PID ADDR NPAGES`` and SIGSTOPs itself; the parent only looks at its memory while
  it is stopped (state ``T``), when the pages cannot change.
* On SIGCONT it reads one line from stdin: a new SPEC (same total page count) to rewrite the mapping
  ("a phase"), prints ``done N`` and stops again.  EOF (or an empty line) makes it exit.

SPEC is ``COUNT:PATTERN[,COUNT:PATTERN...]`` where PATTERN is ``zero``, ``unique``, ``same`` or a
byte value 0..255.  A ``unique`` page holds a 32-byte header (magic, pid, page index, phase) over
zeros, so no two unique pages, in this or any other child, are equal.  A ``same`` page holds
(another magic, 0, page index, 0): equal to the page at the same index of every other child, and to
no other page - many distinct groups of one page per process, like shared libraries' data.
"""

import ctypes
import os
import signal
import struct
import sys
import time

PR_SET_THP_DISABLE = 41
PR_SET_MEMORY_MERGE = 67
PAGE_SIZE = 4096
UNIQUE_MAGIC = 0x6C6B736D_6F72636C  # "lksmorcl"
SAME_MAGIC = 0x6C6B736D_73616D65  # "lksmsame"

_libc = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong
_libc.prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]
_libc.prctl.restype = ctypes.c_int
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p


def _prctl(option: int, arg: int) -> None:
    """prctl or die: a child that is not mergeable would make the kernel oracle silently wrong."""
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")


def parse_spec(text: str) -> list[tuple[int, str | int]]:
    """``64:97,8:zero,4:unique`` -> [(64, 97), (8, 'zero'), (4, 'unique')]."""
    out: list[tuple[int, str | int]] = []
    for part in text.strip().split(","):
        count_s, pattern_s = part.split(":")
        count = int(count_s)
        if count < 0:
            raise ValueError(f"negative count in {part!r}")
        if pattern_s in ("zero", "unique", "same"):
            out.append((count, pattern_s))
        else:
            value = int(pattern_s, 0)
            if not 0 <= value <= 255:
                raise ValueError(f"byte value out of range in {part!r}")
            out.append((count, value))
    return out


def write_pages(addr: int, spec: list[tuple[int, str | int]], phase: int) -> None:
    """Write every page of the mapping per `spec`, touching each page so it is present."""
    pid = os.getpid()
    index = 0
    for count, pattern in spec:
        if pattern == "unique":
            for i in range(index, index + count):
                page = addr + i * PAGE_SIZE
                ctypes.memset(page, 0, PAGE_SIZE)
                header = struct.pack("<QQQQ", UNIQUE_MAGIC, pid, i, phase)
                ctypes.memmove(page, header, len(header))
        elif pattern == "same":
            for i in range(index, index + count):
                page = addr + i * PAGE_SIZE
                ctypes.memset(page, 0, PAGE_SIZE)
                header = struct.pack("<QQQQ", SAME_MAGIC, 0, i, 0)
                ctypes.memmove(page, header, len(header))
        else:
            value = 0 if pattern == "zero" else int(pattern)
            ctypes.memset(addr + index * PAGE_SIZE, value, count * PAGE_SIZE)
        index += count


def main() -> None:
    _prctl(PR_SET_THP_DISABLE, 1)
    _prctl(PR_SET_MEMORY_MERGE, 1)
    spec = parse_spec(sys.argv[1])
    min_cpu = float(sys.argv[2]) if len(sys.argv) > 2 else 0.15
    npages = sum(count for count, _ in spec)
    size = max(npages, 1) * PAGE_SIZE
    prot = 0x1 | 0x2  # PROT_READ | PROT_WRITE
    flags = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
    addr = _libc.mmap(None, size, prot, flags, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap failed")
    write_pages(addr, spec, 0)
    while time.process_time() < min_cpu:
        pass
    sys.stdout.write(f"ready {os.getpid()} {addr} {npages}\n")
    sys.stdout.flush()
    phase = 0
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
        line = sys.stdin.readline()
        if not line.strip():
            return
        phase += 1
        new = parse_spec(line)
        if sum(count for count, _ in new) != npages:
            sys.stdout.write(f"error page count {sum(c for c, _ in new)} != {npages}\n")
            sys.stdout.flush()
            continue
        write_pages(addr, new, phase)
        sys.stdout.write(f"done {phase}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
