"""Helpers shared by the benches: sizes, pattern workloads, the lksmfs scan call, tables, RSS."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lksmfs.system.proc import PAGE_SIZE
from testkit.patterns import Pages, Spec

MIB = 1 << 20
CLASSES = ("unique", "zero", "few", "single", "thp", "mixed")  # memory classes of the benches
FEW = 48  # distinct contents of the `few` class
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes (binary units, as `free -h` would have them)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in _UNITS:
        return int(float(t[:-1]) * _UNITS[t[-1]])
    return int(t)


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def human(nbytes: float) -> str:
    """1073741824 -> '1G', 268435456 -> '256M'."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{int(nbytes // mult)}{unit}"
    return f"{nbytes / MIB:.1f}M"


def make_specs(total_bytes: int, procs: int, share: float) -> list[Spec]:
    """`procs` pattern specs totalling `total_bytes`: in each process the first `share` of its
    pages are 'same' pages (page i equal in every process: many groups of `procs` pages, like
    library data), the rest 'unique'."""
    if procs < 1:
        raise ValueError("need at least one process")
    if not 0.0 <= share <= 1.0:
        raise ValueError("share must be in [0, 1]")
    per = max(1, total_bytes // PAGE_SIZE // procs)
    same = round(per * share)
    specs: list[Spec] = []
    for _ in range(procs):
        spec: list[tuple[int, str | int]] = []
        if same:
            spec.append((same, "same"))
        if per - same:
            spec.append((per - same, "unique"))
        specs.append(spec)
    return specs


def check_memory(total_bytes: int, factor: float = 1.5) -> None:
    """Refuse sizes the machine cannot hold (children's pages + copies made by unmerging)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
            if total_bytes * factor > avail:
                raise SystemExit(
                    f"{human(total_bytes)} x {factor} needs more than MemAvailable "
                    f"({avail / (1 << 30):.1f} GiB)")
            return


def dump_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    print()


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("benches read other processes' memory and drive kernel KSM: run as root")


def require_kernel_ksm() -> None:
    """Root, and the kernel's KSM usable as the oracle; else exit 2 saying why."""
    from testkit.kernel_ksm import KernelKsm

    require_root()
    ok, why = KernelKsm.available()
    if not ok:
        print(f"kernel KSM unavailable: {why}", file=sys.stderr)
        raise SystemExit(2)


def pick(ap: argparse.ArgumentParser, option: str, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated names of `text`, each one of `known` (else an argparse error)."""
    names = [n for n in text.split(",") if n]
    for n in names:
        if n not in known:
            ap.error(f"{option}: unknown {n!r} (one of {', '.join(known)})")
    return names


def class_specs(content: str, size: int, procs: int) -> list[Pages]:
    """The pattern specs of a synthetic class: SIZE bytes over `procs` processes."""
    per = max(1, size // PAGE_SIZE // procs)
    if content == "unique":
        return [[(per // 2, "same"), (per - per // 2, "unique")]] * procs
    if content == "zero":
        return [[(per, "zero")]] * procs
    if content == "few":
        # runs of each content, in a different order in every process
        return [[(per // FEW + (v < per % FEW), (v * 7 + p) % FEW + 1) for v in range(FEW)]
                for p in range(procs)]
    if content == "single":
        return [[(per, 0x41 if p < 2 else 0x42 + p)] for p in range(procs)]
    if content == "thp":
        # the `few` class with zero-filled pages for one of its contents, in huge pages
        return [[(per // FEW + (v < per % FEW), (v * 7 + p) % FEW) for v in range(FEW)]
                for p in range(procs)]
    raise ValueError(content)


def run_measured(cmd: list[str], cwd: str | Path) -> tuple[bytes, bytes, int, float, int]:
    """Run `cmd` in `cwd`: (stdout, stderr, exit status, wall seconds, ru_maxrss KiB of that
    process alone: wait4)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=errf)
        out = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout:
            proc.stdout.close()
        errf.seek(0)
        err = errf.read()
    return out, err, proc.returncode, wall, usage.ru_maxrss
