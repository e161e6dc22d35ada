"""A process whose memory holds exactly what a spec says: the test kit's one child program.

Run as ``python -S testkit/memchild.py SPEC`` (by path, with -S: no site, no numpy, no
lksmfs; only the standard library, so it starts in a few ms of CPU).  Tests and benches
start it through testkit.memproc.MemProcess.

SPEC is JSON::

    {"regions": [{"name": "data", "kind": "private", "pages": "64:97,8:zero,4:unique", "madvise": true},
                 {"name": "shm", "kind": "shared", "pages": "2:9"},
                 {"name": "lib", "kind": "file", "file": "/tmp/x.so", "pages": "2:165,6:unique"}],
     "comm": "lksmfs-child", "cpu_ms": 150, "merge": false, "stop": false}

Regions are mapped in order: `private` is MAP_PRIVATE|MAP_ANONYMOUS, `shared` is
MAP_SHARED|MAP_ANONYMOUS (never mergeable), `file` maps FILE MAP_PRIVATE read-write (its
written pages are anonymous COW pages in a file mapping: a library's .data).  An
anonymous region lies between two PROT_NONE guard pages, so that its VMA is exactly the
region (the kernel would merge it into an adjacent anonymous mapping with the same flags).
``"madvise": true`` calls madvise(MADV_MERGEABLE) on the mapping before it is written
(VM_MERGEABLE: mainline KSM's scope; the kernel merges it whenever its ksmd runs, so a
test does this only under the kernel oracle's lock).  PAGES is
``COUNT:PATTERN[,COUNT:PATTERN...]``, PATTERN one of:

- ``0``..``255`` (``zero`` = 0): every byte of the page is that value;
- ``unique``: a 32-byte header (magic, pid, page index, phase) over zeros: equal to no
  other page, in this process or any other;
- ``same``: (another magic, 0, page index, 0): equal to the page at the same index of
  every other process and to no other page (like a shared library's data);
- ``read``: only read, never written: maps the shared zero page (present, not anonymous);
- ``untouched``: never touched: not present.

Why each step is here:

* prctl(PR_SET_THP_DISABLE) first, before any sizeable allocation: every page is a 4 KiB
  page, so an untouched neighbour never becomes present through a huge page.  Unless
  ``thp``: then a region with ``"hugepage": true`` is 2 MiB aligned and
  madvise(MADV_HUGEPAGE)'d, and the kernel may back it with transparent huge pages.
  ``merge``: prctl(PR_SET_MEMORY_MERGE), every VMA mergeable by the kernel's KSM (only for
  the kernel oracle: a mergeable process skews its global counters).
* Pages are written with memset/memmove through ctypes: no Python-level copy of a
  pattern page is ever left in the heap (it would join the pattern's merge group).
* Then it uses ``cpu_ms`` of CPU (schedstat's sum_exec_runtime, what LKSM's short-task
  rule reads) and prints ``{"pid": PID, "regions": {NAME: [ADDRESS, NPAGES]}}``.

Then one command per stdin line, one answer line each; EOF or an empty line ends it:

- ``rewrite NAME PAGES`` -> ``done N``: rewrite region NAME (same page count), phase N;
- ``fork SPEC`` -> the pid of a forked process that maps SPEC's regions, uses its
  ``cpu_ms`` and then sleeps until killed (SIGCHLD is ignored: no zombies).  A fork costs
  about a millisecond where a fresh interpreter costs ~20 ms of CPU.

With ``"stop": true`` it SIGSTOPs itself before reading each command (the parent sends
SIGCONT after writing one): whenever the parent looks, its memory is still.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import sys
import time
from typing import Any

PR_SET_THP_DISABLE = 41
PR_SET_MEMORY_MERGE = 67
MADV_MERGEABLE = 12
MADV_HUGEPAGE = 14
HPAGE_SIZE = 2 << 20  # a PMD-mapped transparent huge page (x86-64, arm64 with 4 KiB pages)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # the machine's (run by path: no lksmfs import here)
PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
UNIQUE_MAGIC = 0x6C6B736D_6F72636C  # "lksmorcl"
SAME_MAGIC = 0x6C6B736D_73616D65  # "lksmsame"
WORDS = ("zero", "unique", "same", "read", "untouched")

_libc = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong
_libc.prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]
_libc.prctl.restype = ctypes.c_int
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

Pages = list[tuple[int, "str | int"]]


def parse_pages(text: str) -> Pages:
    """``64:97,8:zero,4:unique`` -> [(64, 97), (8, 'zero'), (4, 'unique')]."""
    out: Pages = []
    for part in text.strip().split(","):
        count_s, pattern_s = part.split(":")
        count = int(count_s)
        if count < 0:
            raise ValueError(f"negative count in {part!r}")
        if pattern_s in WORDS:
            out.append((count, pattern_s))
        else:
            value = int(pattern_s, 0)
            if not 0 <= value <= 255:
                raise ValueError(f"byte value out of range in {part!r}")
            out.append((count, value))
    return out


def header(magic: int, pid: int, index: int, phase: int) -> bytes:
    """The first 32 bytes of a `unique` (magic UNIQUE_MAGIC) or `same` page."""
    return struct.pack("<QQQQ", magic, pid, index, phase)


def write_pages(addr: int, pages: Pages, phase: int) -> None:
    """Make every page of the mapping at `addr` what `pages` says."""
    pid = os.getpid()
    index = 0
    for count, pattern in pages:
        if pattern in ("unique", "same"):
            for i in range(index, index + count):
                page = addr + i * PAGE_SIZE
                ctypes.memset(page, 0, PAGE_SIZE)
                h = (header(UNIQUE_MAGIC, pid, i, phase) if pattern == "unique"
                     else header(SAME_MAGIC, 0, i, 0))
                ctypes.memmove(page, h, len(h))
        elif pattern == "read":
            for i in range(index, index + count):
                ctypes.c_ubyte.from_address(addr + i * PAGE_SIZE).value  # noqa: B018
        elif pattern != "untouched":
            value = 0 if pattern == "zero" else int(pattern)
            ctypes.memset(addr + index * PAGE_SIZE, value, count * PAGE_SIZE)
        index += count


def _prctl(option: int, arg: int) -> None:
    """prctl or die: a child that is not what the spec says would make a test silently wrong."""
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")


def _map(region: dict[str, Any], npages: int) -> int:
    """The region's mapping.  An anonymous one lies between two PROT_NONE guard pages:
    the kernel merges a new anonymous mapping into an adjacent one with the same flags,
    and the region's VMA would then hold runtime pages too (smaps, a VMA's anonymous
    pages, an oracle's census by VMA would count them)."""
    kind = region.get("kind", "private")
    size = max(npages, 1) * PAGE_SIZE
    fd = -1
    guard = 0
    huge = bool(region.get("hugepage"))
    if kind == "file":
        fd = os.open(region["file"], os.O_RDONLY)
        flags = MAP_PRIVATE
        prot = PROT_READ | PROT_WRITE
    else:
        flags = (MAP_SHARED if kind == "shared" else MAP_PRIVATE) | MAP_ANONYMOUS
        guard = PAGE_SIZE
        prot = PROT_NONE
    try:
        addr = _libc.mmap(None, size + 2 * guard + (HPAGE_SIZE if huge else 0), prot, flags, fd, 0)
    finally:
        if fd >= 0:
            os.close(fd)  # the mapping keeps the file
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), f"mmap of region {region['name']!r} failed")
    addr = int(addr) + guard
    if huge:  # huge-page aligned, so that every whole 2 MiB of it can be one huge page
        addr += -addr % HPAGE_SIZE
    if guard and _libc.mprotect(addr, size, PROT_READ | PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), f"mprotect of region {region['name']!r} failed")
    if huge and _libc.madvise(addr, size, MADV_HUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), f"madvise(MADV_HUGEPAGE) of region {region['name']!r} failed")
    return addr


def _runtime_ns() -> int:
    try:
        with open("/proc/self/schedstat", "rb") as f:
            return int(f.read().split()[0])
    except OSError:  # CONFIG_SCHED_INFO=n
        return time.process_time_ns()


class Child:
    """The regions of this process: where each one is and what it holds."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.regions: dict[str, list[int]] = {}  # name -> [address, npages]
        for region in spec.get("regions", []):
            pages = parse_pages(region["pages"])
            npages = sum(c for c, _ in pages)
            addr = _map(region, npages)
            if region.get("madvise") and _libc.madvise(addr, max(npages, 1) * PAGE_SIZE, MADV_MERGEABLE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"madvise(MADV_MERGEABLE) of region {region['name']!r}: {os.strerror(err)}")
            write_pages(addr, pages, 0)
            self.regions[region["name"]] = [addr, npages]
        want = int(spec.get("cpu_ms", 0)) * 1_000_000
        while _runtime_ns() < want:
            for _ in range(20000):
                pass
        self.phase = 0

    def rewrite(self, name: str, text: str) -> str:
        addr, npages = self.regions[name]
        pages = parse_pages(text)
        if sum(c for c, _ in pages) != npages:
            return f"error {name} has {npages} pages, not {sum(c for c, _ in pages)}"
        self.phase += 1
        write_pages(addr, pages, self.phase)
        return f"done {self.phase}"


def _fork(spec: dict[str, Any]) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        return pid
    try:
        Child(spec)
        while True:
            signal.pause()
    finally:
        os._exit(1)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if not spec.get("thp"):
        _prctl(PR_SET_THP_DISABLE, 1)
    if spec.get("merge"):
        _prctl(PR_SET_MEMORY_MERGE, 1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if spec.get("comm"):
        with open("/proc/self/comm", "w") as f:
            f.write(spec["comm"])
    child = Child(spec)
    out = sys.stdout
    out.write(json.dumps({"pid": os.getpid(), "regions": child.regions}) + "\n")
    out.flush()
    while True:
        if spec.get("stop"):
            os.kill(os.getpid(), signal.SIGSTOP)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "rewrite":
            name, _, text = arg.partition(" ")
            answer = child.rewrite(name, text)
        elif cmd == "fork":
            answer = str(_fork(json.loads(arg)))
        else:
            answer = f"error unknown command {cmd!r}"
        out.write(answer + "\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
