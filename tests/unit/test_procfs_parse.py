"""Parsers of /proc/PID/maps and smaps on handcrafted text."""

from __future__ import annotations

import os

import pytest

from lksmfs.sources.procfs import parse_maps, parse_smaps

MAPS = b"""\
00400000-00452000 r-xp 00000000 fd:01 1048602                            /usr/bin/my prog
00651000-00652000 rw-p 00051000 fd:01 1048602                            /usr/bin/my prog
00652000-00655000 rw-p 00000000 00:00 0\x20
01a3f000-01a60000 rw-p 00000000 00:00 0                                  [heap]
7f0000000000-7f0000001000 rw-s 00000000 00:05 4242                       /dev/zero (deleted)
7f0000001000-7f0000002000 rw-p 00001000 103:02 77                        /tmp/lib.so (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00102000 r--p 00000000 00:00 0                          [vvar]
7ffd00102000-7ffd00104000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_maps_lines() -> None:
    ms = parse_maps(MAPS)
    assert [m.path for m in ms] == [
        "/usr/bin/my prog",
        "/usr/bin/my prog",
        "",
        "[heap]",
        "/dev/zero (deleted)",
        "/tmp/lib.so (deleted)",
        "[stack]",
        "[vvar]",
        "[vdso]",
    ]  # [vsyscall] is not a VMA
    text, data, bss, heap, shm, deleted, stack, vvar, vdso = ms
    assert (text.start, text.end, text.perms) == (0x400000, 0x452000, "r-xp")
    assert text.file == (os.makedev(0xFD, 0x01), 1048602) and text.is_exec
    assert data.file == text.file and not data.is_exec
    assert bss.file is None and bss.path == "" and bss.npages == 3
    assert heap.is_heap and heap.file is None
    assert stack.is_stack
    assert deleted.file == (os.makedev(0x103, 0x02), 77)
    # MAP_SHARED (perm 's') and kernel special mappings are never mergeable
    assert not shm.mergeable
    assert not vvar.mergeable and not vdso.mergeable
    assert all(m.mergeable for m in (text, data, bss, heap, deleted, stack))
    # maps alone cannot tell whether a VMA has an anon_vma: assume it may
    assert all(m.has_anon for m in ms)


def _smaps_entry(head: str, anon_kb: int, vmflags: str) -> str:
    return (
        f"{head}\n"
        "Size:                  8 kB\n"
        "Rss:                   8 kB\n"
        f"Anonymous:          {anon_kb} kB\n"
        "THPeligible:    0\n"
        f"VmFlags: {vmflags}\n"
    )


@pytest.mark.parametrize("flag", ["sh", "pf", "io", "de", "ht", "mm"])
def test_smaps_vmflags_exclude(flag: str) -> None:
    text = _smaps_entry("10000-12000 rw-p 00000000 00:00 0", 8, f"rd wr mr mw me ac {flag}")
    (m,) = parse_smaps(text.encode())
    assert not m.mergeable


def test_smaps_mergeable_and_has_anon() -> None:
    text = (
        _smaps_entry("10000-12000 rw-p 00000000 00:00 0", 8, "rd wr mr mw me ac")
        + _smaps_entry("12000-14000 rw-p 00000000 00:00 0   /x y (deleted)", 0, "rd wr mr mw me")
        + _smaps_entry("14000-15000 r--p 00000000 00:00 0   [vvar]", 0, "rd mr pf io de dd")
        + _smaps_entry("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]", 0, "ex")
    )
    a, b, vvar = parse_smaps(text.encode())
    assert (a.start, a.end, a.mergeable, a.has_anon) == (0x10000, 0x12000, True, True)
    assert (b.path, b.mergeable, b.has_anon) == ("/x y (deleted)", True, False)
    assert not vvar.mergeable


def test_smaps_entry_without_vmflags_uses_perms_only() -> None:
    text = "20000-21000 rw-s 00000000 00:01 5 /dev/shm/x\nAnonymous: 0 kB\n"
    text += "21000-22000 rw-p 00000000 00:00 0\nAnonymous: 4 kB\n"
    shared, priv = parse_smaps(text.encode())
    assert not shared.mergeable and shared.file == (os.makedev(0, 1), 5)
    assert priv.mergeable and priv.has_anon


def test_smaps_anon_huge_pages_per_vma() -> None:
    """AnonHugePages belongs to the VMA it follows: a THP-backed heap counts its 4 KiB
    pages, the next VMA starts again at 0."""
    text = (
        "7f0000000000-7f0000600000 rw-p 00000000 00:00 0\nAnonymous:   6144 kB\n"
        "AnonHugePages:   4096 kB\nVmFlags: rd wr mr mw me ac\n"
        "7f0000600000-7f0000601000 rw-p 00000000 00:00 0\nAnonymous:      4 kB\nVmFlags: rd wr mr mw me ac\n"
    )
    thp, small = parse_smaps(text.encode())
    assert (thp.anon_pages, thp.huge_pages) == (1536, 1024)
    assert (small.anon_pages, small.huge_pages) == (1, 0)


def test_kernel_version_of_a_uname_release() -> None:
    from lksmfs.sources.procfs import _kernel_version

    assert _kernel_version("6.18.44-fc-v1045") == (6, 18)
    assert _kernel_version("6.12.0") == (6, 12)
    assert _kernel_version("5.15.0-91-generic") == (5, 15)
    assert _kernel_version("6.13-rc1") == (6, 13)
    assert _kernel_version("6.1rc2") == (6, 1)
    assert _kernel_version("weird") == (0, 0)
