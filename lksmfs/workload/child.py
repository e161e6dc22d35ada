"""One real workload process: builds an instance's memory, then obeys commands on stdin.

Started by lksmfs.workload.spawn as `python -S -m lksmfs.workload.child` (no site, no
numpy: the whole start-up costs a few ms of CPU, so short tasks stay short).  Protocol,
one line each way:

    stdin  line 1: JSON {"workload": <to_dict of this app>, "app", "index", "round",
                         "libs": {name: file path}, "burn_cap_ms"}
    stdout:        "ready " + JSON {"pid", "sections": {sid: [start address, npages]}}
    stdin:         "round N" | "rewrite FRACTION NUMBER" | "exit"   (EOF = exit)
    stdout:        "ok" after each round/rewrite, once the pages are written

Memory, realised as a dynamic loader and allocator would leave it:
- each library: r-xp text, r--p rodata, rw-p .data mapped MAP_PRIVATE from the library
  file at a random base (MAP_FIXED_NOREPLACE), every .data page written (COW: anonymous
  pages in a file mapping), then the .bss as an anonymous mapping right at .data's end;
- heap: pages obtained with sbrk(), so they are in the real [heap] VMA;
- stack: pages written below the current [stack] VMA, which the kernel grows down to them;
- extra anon mappings: anonymous MAP_PRIVATE at random addresses.
Only these pages follow the workload; the interpreter's own memory comes on top.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
from typing import Any

from lksmfs.system.proc import PAGE_SIZE, runtime_ns
from lksmfs.workload.model import InstanceModel, page_bytes
from lksmfs.workload.schema import KSM_PRCTL, parse_workload

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
LIB_AREA = (0x7000_0000_0000, 0x7E00_0000_0000)  # where random bases are drawn
PR_SET_THP_DISABLE = 41
PR_SET_MEMORY_MERGE = 67
MADV_MERGEABLE = 12
STACK_GAP = 16  # pages left between the live stack and the workload's stack pages

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.sbrk.restype = ctypes.c_void_p
_libc.sbrk.argtypes = [ctypes.c_ssize_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mmap_at(addr: int, npages: int, prot: int, fd: int = -1, offset_pages: int = 0) -> bool:
    """Map exactly at `addr` or not at all (False when something is already there)."""
    flags = MAP_PRIVATE | MAP_FIXED_NOREPLACE | (MAP_ANONYMOUS if fd < 0 else 0)
    got = _libc.mmap(addr, npages * PAGE_SIZE, prot, flags, fd, offset_pages * PAGE_SIZE)
    if got is None or got == MAP_FAILED:
        err = ctypes.get_errno()
        if err == 17:  # EEXIST: taken, try another base
            return False
        raise OSError(err, f"mmap at {addr:#x}: {os.strerror(err)}")
    if got != addr:  # a kernel without MAP_FIXED_NOREPLACE took it as a hint
        _libc.munmap(got, npages * PAGE_SIZE)
        return False
    return True


def _random_base(rng: random.Random, npages: int) -> int:
    lo, hi = LIB_AREA
    return (rng.randrange(lo, hi - npages * PAGE_SIZE) // PAGE_SIZE) * PAGE_SIZE


def _map_library(rng: random.Random, path: str, text: int, rodata: int, data: int,
                 bss: int) -> tuple[int, int]:
    """Map one library like ld.so does; returns (.data start, .bss start)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(100):
            base = _random_base(rng, text + rodata + data + bss)
            done: list[tuple[int, int]] = []
            pieces = [(text, PROT_READ | PROT_EXEC, fd, 0), (rodata, PROT_READ, fd, text),
                      (data, PROT_READ | PROT_WRITE, fd, text + rodata),
                      (bss, PROT_READ | PROT_WRITE, -1, 0)]
            addr = base
            ok = True
            for npages, prot, f, off in pieces:
                if not npages:
                    continue
                if not _mmap_at(addr, npages, prot, f, off):
                    ok = False
                    break
                done.append((addr, npages))
                addr += npages * PAGE_SIZE
            if ok:
                data_start = base + (text + rodata) * PAGE_SIZE
                return data_start, data_start + data * PAGE_SIZE
            for a, n in done:
                _libc.munmap(a, n * PAGE_SIZE)
        raise OSError(f"no free address range for {path}")
    finally:
        os.close(fd)  # the mappings keep the file


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _heap_area(npages: int) -> int:
    """Grow the program break by npages (page aligned): pages of the real [heap] VMA."""
    cur = int(_libc.sbrk(0))
    pad = (-cur) % PAGE_SIZE
    got = _libc.sbrk(pad + npages * PAGE_SIZE)
    if got is None or got == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "sbrk failed")
    return int(got) + pad


def _stack_area(npages: int) -> int:
    """Address of npages just below the [stack] VMA (with a gap): touching them grows it."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[stack]"):
                start = int(line.split("-", 1)[0], 16)
                return start - (STACK_GAP + npages) * PAGE_SIZE
    raise OSError("no [stack] mapping")


def _anon_area(rng: random.Random, npages: int) -> int:
    for _ in range(100):
        addr = _random_base(rng, npages)
        if _mmap_at(addr, npages, PROT_READ | PROT_WRITE):
            return addr
    raise OSError("no free address range for an anonymous mapping")


class Child:
    """The instance's model plus where each of its sections lives in this process."""

    def __init__(self, init: dict[str, Any]) -> None:
        # no transparent huge pages: they would make untouched neighbours present
        _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        workload = parse_workload(init["workload"], "<spawn>")
        app = workload.app(init["app"])
        # the app's `ksm: prctl`, or benches' kernel_merge: every mapping, now and later,
        # mergeable by the kernel's KSM (and in scope for lksmfs's policy ksm)
        if init.get("kernel_merge") or app.ksm == KSM_PRCTL:
            _check(_libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0), "prctl(PR_SET_MEMORY_MERGE)")
        self.model = InstanceModel(workload, app, int(init["index"]))
        self.model.vol_round = int(init["round"])
        self.burn_cap_ms = int(init.get("burn_cap_ms", 200))
        rng = random.SystemRandom()
        self.addr: dict[str, int] = {}
        for lib in workload.app_libraries(app):
            data, bss = _map_library(rng, init["libs"][lib.name], lib.text_pages,
                                     lib.rodata_pages, lib.data_pages, lib.bss_pages)
            if lib.data_pages:
                self.addr[f"lib:{lib.name}:data"] = data
            if lib.bss_pages:
                self.addr[f"lib:{lib.name}:bss"] = bss
        if "heap" in self.model.sections:
            self.addr["heap"] = _heap_area(app.heap.pages)
        if "stack" in self.model.sections:
            self.addr["stack"] = _stack_area(app.stack.pages)
        for a in app.anon:
            self.addr[f"anon:{a.name}"] = _anon_area(rng, a.pages)
        for sid, sec in self.model.sections.items():
            # stack: from the top down, so the VMA grows one page at a time
            offs = range(sec.npages - 1, -1, -1) if sid == "stack" else range(sec.npages)
            self.write(sid, offs)
        self.madvise_mergeable(app)

    def madvise_mergeable(self, app: Any) -> None:
        """The app's `ksm: [AREA, ...]`: madvise(MADV_MERGEABLE) on exactly the pages the
        simulation counts for each area (heap, stack, every library's .data or .bss, a
        named anon mapping), once they exist: VM_MERGEABLE, `mg` in smaps."""
        if not isinstance(app.ksm, tuple):
            return
        for sid, base in self.addr.items():
            kind = sid.rsplit(":", 1)[-1]  # heap, stack, data, bss, or the anon name
            if kind in app.ksm:
                npages = self.model.sections[sid].npages
                _check(_libc.madvise(base, npages * PAGE_SIZE, MADV_MERGEABLE), f"madvise({sid})")

    def write(self, sid: str, offsets: Any) -> None:
        sec = self.model.sections[sid]
        base = self.addr[sid]
        for off in offsets:
            ctypes.memmove(base + off * PAGE_SIZE, page_bytes(self.model.key(sec, off)), PAGE_SIZE)

    def apply(self, changed: dict[str, list[int]]) -> None:
        for sid, offs in changed.items():
            self.write(sid, offs)

    def burn(self) -> None:
        """Use CPU until the task has run min(cpu_ms, burn_cap_ms): only the short-task
        threshold (100 ms) matters, so a 60 s daemon need not burn a minute."""
        want = min(self.model.app.cpu_ms, self.burn_cap_ms) * 1_000_000
        x = 0
        while runtime_ns() < want:
            for i in range(20000):
                x ^= i
        del x

    def layout(self) -> dict[str, list[int]]:
        return {sid: [self.addr[sid], self.model.sections[sid].npages] for sid in self.addr}


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0
    child = Child(json.loads(line))
    child.burn()
    out = sys.stdout
    out.write("ready " + json.dumps({"pid": os.getpid(), "sections": child.layout()}) + "\n")
    out.flush()
    for cmd in sys.stdin:
        words = cmd.split()
        if not words:
            continue
        if words[0] == "exit":
            break
        if words[0] == "round":
            child.apply(child.model.set_round(int(words[1])))
        elif words[0] == "rewrite":
            child.apply(child.model.rewrite(float(words[1]), int(words[2])))
        else:
            out.write(f"error unknown command {words[0]!r}\n")
            out.flush()
            continue
        out.write("ok\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
