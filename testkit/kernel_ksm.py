"""The kernel's own KSM as an oracle for lksmfs (SPEC §5).

The machine's kernel has KSM at /sys/kernel/mm/ksm and ``prctl(PR_SET_MEMORY_MERGE)``.  Stopped
processes keep their memory still, so what the kernel's ksmd converges to on them is what an LKSM
kernel would report for the same processes, and so what lksmfs must report in shadow mode.

* `KernelKsm` drives /sys/kernel/mm/ksm and always puts it back as it found it.
* testkit.memproc.PatternGroup: stopped children (testkit/memchild.py) whose one anonymous
  mapping holds pages written from a pattern spec, rewritable phase by phase.
* testkit.patterns.expected_counts / spec_groups derive pages_shared/pages_sharing by hand.
* `anon_page_census` groups the other anonymous pages of those children by content.

What is compared, and why whole processes: PR_SET_MEMORY_MERGE makes *every* VMA of a child
mergeable, so the kernel also merges the Python runtime's own anonymous pages (identical heap pages
across children, zero-filled pages, ...).  The kernel only exposes global counters, so restricting
its answer to the pattern mapping is impossible; lksmfs scans every anonymous page of the pids it is
given, which is the same scope.  Hence the oracle compares whole-process numbers of both, with the
same max_page_sharing.  The hand derivation then needs the runtime background: the pattern pages
are written so they cannot collide with runtime contents (byte patterns other than 0 are never a
whole runtime page; unique pages carry a magic header), and ``smaps``' per-VMA ``KSM:`` field gives
the kernel's count of merged pages *inside the pattern mapping*, which is checked against the hand
derivation on its own.  Zero pages are the one pattern that can join runtime pages (Python has
zero-filled anonymous pages); tests account for that explicitly.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lksmfs.system.proc import PAGE_SIZE

KSM_DIR = Path("/sys/kernel/mm/ksm")
LOCK_PATH = Path("/run/lock/lksmfs-kernel-ksm.lock")

# Settings whose value must be restored with care; everything else writable is restored as read.
_RUN = "run"
_ADVISOR = "advisor_mode"


class OracleError(RuntimeError):
    """The kernel oracle could not reach a trustworthy answer (timeout, foreign KSM users...)."""


@dataclass
class Convergence:
    """What `KernelKsm.converge` saw.

    `counters` is the converged snapshot.  `wall_s` is the time from ``run=1`` until the scan at
    whose end the final counters were first seen; `confirmed_s` until convergence was confirmed;
    `scans3_s` until 3 full scans had completed (the work LKSM's 3 initial rounds do).
    """

    counters: dict[str, int]
    wall_s: float
    confirmed_s: float
    scans3_s: float
    full_scans: int
    samples: list[tuple[int, float, tuple[int, ...]]] = field(default_factory=list)


class KernelKsm:
    """Context manager over /sys/kernel/mm/ksm: configure, converge, unmerge, always restore.

    On entry it takes an exclusive flock (so two oracle users on the machine never interleave; the
    counters are global) and saves every writable setting.  On exit it unmerges (``run=2``), waits
    for pages_shared and pages_sharing to reach 0, stops (``run=0``) and writes the saved settings
    back - the ones the kernel refuses while stable nodes exist (max_page_sharing,
    merge_across_nodes: EBUSY) only after the unmerge, and advisor_mode last (with an advisor on,
    pages_to_scan is not writable).
    """

    def __init__(self, path: Path = KSM_DIR, lock_path: Path = LOCK_PATH) -> None:
        self.path = path
        self.lock_path = lock_path
        self.saved: dict[str, str] = {}
        self._lock_fd: int | None = None

    # -- availability

    @classmethod
    def available(cls, path: Path = KSM_DIR) -> tuple[bool, str]:
        """(True, '') when the oracle can run here, else (False, why) for a pytest skip."""
        if not path.is_dir():
            return False, f"{path} absent: kernel built without CONFIG_KSM"
        if os.geteuid() != 0:
            return False, "kernel KSM oracle needs root (writes /sys/kernel/mm/ksm)"
        if not os.access(path / _RUN, os.W_OK):
            return False, f"{path}/run is not writable (read-only sysfs?)"
        try:
            with open(path / _RUN, "w") as f:  # rewrite the current value: a no-op probe
                f.write((path / _RUN).read_text().strip())
        except OSError as exc:
            return False, f"cannot write {path}/run: {exc.strerror}"
        if not Path("/proc/self/ksm_stat").exists():
            return False, "no /proc/PID/ksm_stat: kernel too old for PR_SET_MEMORY_MERGE (< 6.4)"
        return True, ""

    # -- raw access

    def read(self, name: str) -> int:
        """An integer attribute."""
        return int((self.path / name).read_text().split()[0])

    def read_raw(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def write(self, name: str, value: int | str) -> None:
        """Write one attribute; an OSError carries the kernel's errno (EBUSY, EINVAL)."""
        fd = os.open(self.path / name, os.O_WRONLY)
        try:
            os.write(fd, f"{value}\n".encode())
        finally:
            os.close(fd)

    def writable(self) -> list[str]:
        """Names of the writable attributes (mode has the owner-write bit)."""
        return sorted(p.name for p in self.path.iterdir() if p.stat().st_mode & 0o200)

    def counters(self) -> dict[str, int]:
        """Every read-only attribute, as ints (what the kernel reports right now)."""
        out: dict[str, int] = {}
        for p in sorted(self.path.iterdir()):
            if p.stat().st_mode & 0o200:
                continue
            try:
                out[p.name] = int(p.read_text().split()[0])
            except (ValueError, IndexError, OSError):
                continue
        return out

    # -- context management

    def __enter__(self) -> KernelKsm:
        self.path.stat()  # fail early when absent
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise OracleError(f"{self.lock_path} held by another oracle user") from None
                time.sleep(0.05)
        self._lock_fd = fd
        try:
            self.saved = {name: self._saved_form(name) for name in self.writable()}
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.restore()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _saved_form(self, name: str) -> str:
        """The value to write back: advisor_mode reads ``[none] scan-time``, we want ``none``."""
        raw = self.read_raw(name)
        if "[" in raw:
            return raw[raw.index("[") + 1 : raw.index("]")]
        return raw

    def restore(self) -> None:
        """Unmerge, stop, then write every saved setting back; attempts every step, then raises."""
        errors: list[str] = []
        try:
            self.unmerge()
        except (OSError, OracleError) as exc:
            errors.append(f"unmerge: {exc}")
        try:
            self.write(_RUN, 0)
        except OSError as exc:
            errors.append(f"run=0: {exc}")
        if _ADVISOR in self.saved:
            try:
                self.write(_ADVISOR, "none")
            except OSError as exc:
                errors.append(f"{_ADVISOR}=none: {exc}")
        for name, value in self.saved.items():
            if name in (_RUN, _ADVISOR):
                continue
            if self._saved_form(name) == value:
                continue
            try:
                self.write(name, value)
            except OSError as exc:
                errors.append(f"{name}={value}: {exc}")
        if _ADVISOR in self.saved and self.saved[_ADVISOR] != "none":
            try:
                self.write(_ADVISOR, self.saved[_ADVISOR])
            except OSError as exc:
                errors.append(f"{_ADVISOR}: {exc}")
        # run last: if it was merging before us, let it merge again.
        if self.saved.get(_RUN, "0") != "0":
            try:
                self.write(_RUN, self.saved[_RUN])
            except OSError as exc:
                errors.append(f"run={self.saved[_RUN]}: {exc}")
        if errors:
            raise OracleError("could not fully restore /sys/kernel/mm/ksm: " + "; ".join(errors))

    # -- operations

    def unmerge(self, timeout_s: float = 120.0) -> None:
        """``run=2`` then wait (deadline) until no KSM page is left, then ``run=0``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.write(_RUN, 2)  # synchronous in the kernel, but may be interrupted
                break
            except InterruptedError:
                if time.monotonic() > deadline:
                    raise
        while True:
            c = self.counters()
            if c.get("pages_shared", 0) == 0 and c.get("pages_sharing", 0) == 0:
                break
            if time.monotonic() > deadline:
                raise OracleError(f"unmerge did not finish in {timeout_s}s: {c}")
            time.sleep(0.01)
        self.write(_RUN, 0)

    def configure(
        self,
        *,
        pages_to_scan: int = 10000,
        sleep_millisecs: int = 0,
        max_page_sharing: int | None = None,
        smart_scan: int = 0,
        use_zero_pages: int = 0,
        merge_across_nodes: int | None = None,
    ) -> None:
        """Stop KSM, unmerge (max_page_sharing needs no stable nodes), set the scanning knobs.

        smart_scan=0 because smart scan skips pages that failed to merge before, so the number of
        scans to converge would depend on history; the advisor is switched off because it
        overrides pages_to_scan.
        """
        self.unmerge()
        names = set(self.writable())
        if _ADVISOR in names:
            self.write(_ADVISOR, "none")
        if max_page_sharing is not None and self.read("max_page_sharing") != max_page_sharing:
            self.write("max_page_sharing", max_page_sharing)
        if merge_across_nodes is not None and "merge_across_nodes" in names:
            if self.read("merge_across_nodes") != merge_across_nodes:
                self.write("merge_across_nodes", merge_across_nodes)
        self.write("pages_to_scan", pages_to_scan)
        self.write("sleep_millisecs", sleep_millisecs)
        if "smart_scan" in names:
            self.write("smart_scan", smart_scan)
        self.write("use_zero_pages", use_zero_pages)

    def converge(
        self,
        timeout_s: float = 120.0,
        *,
        min_scans: int = 3,
        stable_scans: int = 2,
        poll_s: float = 0.005,
    ) -> Convergence:
        """Start ksmd (``run=1``) and wait for convergence; returns the counters and timings.

        Converged means: at least `min_scans` full scans completed since ``run=1`` (ksm's checksum
        gate needs 2 visits before a page enters the unstable tree, a 3rd confirms), and the
        tuple (pages_shared, pages_sharing, stable_node_chains, stable_node_dups) read at a
        full-scan boundary (full_scans equal before and after the read) is identical at two
        boundaries `stable_scans` or more full scans apart, with no different value seen in
        between.  pages_unshared is left out: on stopped processes it was seen to flicker by one
        page from scan to scan while nothing else moved.  ksmd is left running; call `unmerge`
        (or leave the context) to undo the merges.
        """
        keys = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
        start_scans = self.read("full_scans")
        t0 = time.monotonic()
        self.write(_RUN, 1)
        deadline = t0 + timeout_s
        samples: list[tuple[int, float, tuple[int, ...]]] = []
        scans3_s: float | None = None
        last_fs = start_scans
        while True:
            if time.monotonic() > deadline:
                raise OracleError(
                    f"kernel KSM did not converge in {timeout_s}s; samples={samples[-5:]}")
            time.sleep(poll_s)
            fs = self.read("full_scans")
            if fs == last_fs:
                continue
            now = time.monotonic() - t0
            c = self.counters()
            if c["full_scans"] != fs:
                continue  # a scan ended while reading: take the next boundary
            last_fs = fs
            done = fs - start_scans
            if scans3_s is None and done >= 3:
                scans3_s = now
            if done < min_scans:
                samples.append((fs, now, tuple(c.get(k, 0) for k in keys)))
                continue
            value = tuple(c.get(k, 0) for k in keys)
            samples.append((fs, now, value))
            # first sample of the current run of identical values
            first = len(samples) - 1
            while first > 0 and samples[first - 1][2] == value:
                first -= 1
            first_fs, first_t, _ = samples[first]
            if first_fs - start_scans < min_scans:
                # identical run starts before min_scans: convergence counts from min_scans
                first_fs = max(first_fs, start_scans + min_scans)
            if fs - first_fs >= stable_scans:
                return Convergence(
                    counters=c,
                    wall_s=first_t,
                    confirmed_s=now,
                    scans3_s=scans3_s if scans3_s is not None else now,
                    full_scans=done,
                    samples=samples,
                )

    def stopped_counters(self) -> dict[str, int]:
        """Stop ksmd (``run=0``: the store waits for the batch under way) and read every
        counter.  With pages_to_scan above the pages scanned, each batch is one whole pass,
        so this reads a pass boundary: no rmap_item is caught between leaving the old
        unstable tree and joining the new one, which otherwise shows as a page moving from
        pages_unshared to pages_volatile and back (LTP's final_group_check stops ksmd for
        the same reason)."""
        self.write(_RUN, 0)
        return self.counters()

    def per_pass(self, passes: int, names: Iterable[str], timeout_s: float = 60.0) -> list[dict[str, int]]:
        """Start ksmd (``run=1``) and read `names` at each of the next `passes` full-scan
        boundaries, as differences from before the start.  Needs each batch to be one whole
        pass (pages_to_scan above the pages) and sleep_millisecs long enough to read
        between two of them (every read is checked to fall between the same two passes)."""
        names = list(names)
        base = {n: self.read(n) for n in ("full_scans", *names)}
        self.write(_RUN, 1)
        out: list[dict[str, int]] = []
        deadline = time.monotonic() + timeout_s
        last = base["full_scans"]
        while len(out) < passes:
            if time.monotonic() > deadline:
                raise OracleError(f"only {len(out)} of {passes} full scans in {timeout_s}s")
            time.sleep(0.002)
            fs = self.read("full_scans")
            if fs == last:
                continue
            got = {n: self.read(n) - base[n] for n in names}
            if self.read("full_scans") != fs or fs != last + 1:
                raise OracleError(f"a pass boundary went by unread (full_scans {last} -> {fs}): "
                                  "sleep_millisecs too short for this machine")
            got["full_scans"] = fs - base["full_scans"]
            out.append(got)
            last = fs
        self.write(_RUN, 0)
        return out

    def foreign_mergeable(self, ours: Iterable[int]) -> list[int]:
        """Pids, other than `ours`, whose memory the kernel's KSM may merge (skews counters)."""
        mine = set(ours)
        out = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in mine:
                continue
            try:
                text = Path(entry.path, "ksm_stat").read_text()
            except OSError:
                continue
            if "ksm_mergeable: yes" in text or "ksm_merge_any: yes" in text:
                out.append(int(entry.name))
        return out


# ---------------------------------------------------------------- a page census (hand check)

_PM_PRESENT = 1 << 63
_PM_FILE = 1 << 61  # file page or shared anonymous
_PM_PFN = (1 << 55) - 1
_KPF_ANON = 1 << 12
_KPF_ZERO_PAGE = 1 << 24
_SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")


def anon_page_census(
    pids: Iterable[int], exclude: dict[int, tuple[int, int]] | None = None
) -> dict[bytes, int]:
    """Group the present anonymous pages of `pids` by content: digest -> number of pages.

    A deliberately naive second opinion (pagemap present + not file, kpageflags ANON and not the
    zero page, contents from /proc/PID/mem), used to derive by hand how many of the runtime's
    pages can merge.  `exclude` maps pid -> (start, end) byte range left out (the pattern mapping),
    page by page: the kernel merges a new anonymous mapping into an adjacent one with the same
    flags, so the VMA holding the pattern often holds runtime pages too, which must be counted.
    Needs root (PFNs) and stopped processes (stable contents).
    """
    groups: dict[bytes, int] = {}
    with open("/proc/kpageflags", "rb", buffering=0) as kpf:
        for pid in pids:
            skip = (exclude or {}).get(pid)
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            with (
                open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm,
                open(f"/proc/{pid}/mem", "rb", buffering=0) as mem,
            ):
                for line in maps:
                    fields_ = line.split(maxsplit=5)
                    start_s, end_s = fields_[0].split("-")
                    start, end = int(start_s, 16), int(end_s, 16)
                    path = fields_[5] if len(fields_) > 5 else ""
                    if path in _SPECIAL or "r" not in fields_[1] or fields_[1][3] == "s":
                        continue
                    npages = (end - start) // PAGE_SIZE
                    entries = os.pread(pm.fileno(), npages * 8, (start // PAGE_SIZE) * 8)
                    for i in range(len(entries) // 8):
                        if skip is not None and skip[0] <= start + i * PAGE_SIZE < skip[1]:
                            continue
                        e = int.from_bytes(entries[i * 8 : i * 8 + 8], "little")
                        if not e & _PM_PRESENT or e & _PM_FILE:
                            continue
                        pfn = e & _PM_PFN
                        flags = int.from_bytes(os.pread(kpf.fileno(), 8, pfn * 8), "little")
                        if not flags & _KPF_ANON or flags & _KPF_ZERO_PAGE:
                            continue
                        data = os.pread(mem.fileno(), PAGE_SIZE, start + i * PAGE_SIZE)
                        key = hashlib.blake2b(data, digest_size=16).digest()
                        groups[key] = groups.get(key, 0) + 1
    return groups
