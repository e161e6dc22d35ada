"""The read+hash floor of any user-space scanner: one pass over the anonymous memory of some
pids, as small a program as can do it (bench/floor.py runs it as a whole process).

    sudo .venv/bin/python -m bench.floorscan PID [PID...]

It lists the present anonymous pages (/proc/PID/maps, pagemap: present and not
file-backed; /proc/kpageflags for the pages pagemap does not call exclusive: anonymous and
not the zero page), reads them from /proc/PID/mem in 256 KiB preads, hashes each 4 KiB
page (xxh3, 64 bits), and groups the digests with numpy (one sort).  It prints JSON: the
pages, how many groups of each size (group size -> number of groups), the zero-filled
pages, and the time spent in-process.  Nothing of lksmfs is imported: this is the cost
floor lksmfs's `scan` is compared with (bench/floor.py turns the group sizes into KSM's
counters).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import xxhash

PAGE = 4096
READ = 64  # pages per pread: 256 KiB
PM_PFN = np.uint64((1 << 55) - 1)
SPECIAL = (b"[vvar]", b"[vvar_vclock]", b"[vdso]", b"[vsyscall]", b"[uprobes]", b"[sigpage]")
KPF_ANON, KPF_ZERO_PAGE = 1 << 12, 1 << 24


def anon_vpns(pid: int, kpf: int) -> np.ndarray:
    """Sorted vpns of the present anonymous pages of `pid` (private mappings only)."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        maps = f.read().splitlines()
    out: list[np.ndarray] = []
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for line in maps:
            parts = line.split(None, 5)
            if parts[1][3:4] == b"s" or (len(parts) == 6 and parts[5].strip() in SPECIAL):
                continue
            lo, hi = (int(x, 16) // PAGE for x in parts[0].split(b"-"))
            ent = np.frombuffer(os.pread(pm, (hi - lo) * 8, lo * 8), dtype=np.uint64)
            present = (ent >> np.uint64(63)) & ~(ent >> np.uint64(61)) & np.uint64(1)
            idx = np.flatnonzero(present)
            if not idx.size:
                continue
            shared = np.flatnonzero(((ent[idx] >> np.uint64(56)) & np.uint64(1)) == 0)
            if shared.size:  # not exclusively mapped: maybe the zero page, ask kpageflags
                keep = np.ones(idx.size, dtype=bool)
                for j in shared.tolist():
                    pfn = int(ent[idx[j]] & PM_PFN)
                    flags = int.from_bytes(os.pread(kpf, 8, pfn * 8), "little")
                    keep[j] = bool(flags & KPF_ANON) and not flags & KPF_ZERO_PAGE
                idx = idx[keep]
            out.append(idx.astype(np.uint64) + np.uint64(lo))
    finally:
        os.close(pm)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def digests(pid: int, vpns: np.ndarray, buf: bytearray) -> bytes:
    """xxh3-64 of each page, in 256 KiB preads over runs of consecutive vpns."""
    mv = memoryview(buf)
    h = xxhash.xxh3_64_digest
    parts: list[bytes] = []
    if not vpns.size:
        return b""
    breaks = np.flatnonzero(np.diff(vpns) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [vpns.size])).tolist()
    slices = [slice(o, o + PAGE) for o in range(0, READ * PAGE, PAGE)]
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for i0, i1 in zip(starts, ends, strict=True):
            addr = int(vpns[i0]) * PAGE
            for j in range(i0, i1, READ):
                n = min(READ, i1 - j)
                got = os.preadv(mem, [mv[: n * PAGE]], addr + (j - i0) * PAGE)
                if got < n * PAGE:  # unmapped meanwhile: what was read, zeros after
                    mv[got : n * PAGE] = bytes(n * PAGE - got)
                parts.append(b"".join([h(mv[s]) for s in slices[:n]]))
    finally:
        os.close(mem)
    return b"".join(parts)


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    kpf = os.open("/proc/kpageflags", os.O_RDONLY)
    buf = bytearray(READ * PAGE)
    raw = b"".join([digests(int(pid), anon_vpns(int(pid), kpf), buf) for pid in argv])
    d = np.frombuffer(raw, dtype=">u8")
    _, counts = np.unique(d, return_counts=True)  # one sort: the groups of equal pages
    sizes, nsizes = np.unique(counts, return_counts=True)
    zero = int(np.count_nonzero(d == np.uint64(xxhash.xxh3_64_intdigest(bytes(PAGE)))))
    json.dump({"pages": int(d.size), "groups": dict(zip(sizes.tolist(), nsizes.tolist(), strict=True)),
               "zero_pages": zero, "scan_s": time.perf_counter() - t0}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
